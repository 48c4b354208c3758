<?php
// Takes its request body slowly: one read (PHP reads 8 KiB at a time) per ?ms= milliseconds,
// then says how much it read.
// With a large body the upload to FPM lasts longer than a short read timeout.
$ms = max(0, (int) ($_GET['ms'] ?? 50));
$in = fopen('php://input', 'rb');
$length = 0;
while (!feof($in)) {
    usleep($ms * 1000);
    $c = fread($in, 65536);
    if ($c === false || $c === '') {
        break;
    }
    $length += strlen($c);
}
header('Content-Type: text/plain');
echo "read $length\n";
