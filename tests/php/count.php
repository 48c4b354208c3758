<?php
// Appends one line per execution to the file given by ?file=/abs/path (or the env var
// FPMGATE_TEST_COUNT_FILE), under flock, so tests can count how often a script ran:
// a retried POST must never run twice. Optional ?ms=N sleeps after recording.
$file = $_GET['file'] ?? getenv('FPMGATE_TEST_COUNT_FILE');
if (!is_string($file) || $file === '' || $file[0] !== '/') {
    http_response_code(400);
    echo "count.php needs ?file=/absolute/path or FPMGATE_TEST_COUNT_FILE\n";
    exit;
}
$fh = fopen($file, 'ab');
flock($fh, LOCK_EX);
fwrite($fh, sprintf("%s %s %d %.6f\n", $_SERVER['REQUEST_METHOD'], $_SERVER['REQUEST_URI'] ?? '', getmypid(), microtime(true)));
fflush($fh);
flock($fh, LOCK_UN);
fclose($fh);
$ms = max(0, (int) ($_GET['ms'] ?? 0));
if ($ms > 0) {
    usleep($ms * 1000);
}
header('Content-Type: text/plain');
echo "ok";
