<?php
// header_big.php?bytes=N sends one header "X-Big: " followed by N 'a's (response header
// limit tests: 502 header_too_big past max_response_header).
$n = max(0, (int) ($_GET['bytes'] ?? 0));
header('X-Big: ' . str_repeat('a', $n));
header('Content-Type: text/plain');
echo "ok";
