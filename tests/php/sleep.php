<?php
// sleep.php?ms=500 holds a worker that long (for queue, timeout and drain tests).
$ms = max(0, (int) ($_GET['ms'] ?? 500));
usleep($ms * 1000);
header('Content-Type: application/json');
echo json_encode(['pid' => getmypid(), 'slept_ms' => $ms]);
