<?php
// Answers before it reads its input: a head and `out` bytes of output first, then the
// length of the request body, read last. Sent a large body (PUT: PHP does not read it
// before the script runs), neither side may wait for the other to finish.
header('Content-Type: text/plain');
$out = (int) ($_GET['out'] ?? 0);
$chunk = str_repeat('a', 65536);
for ($i = 0; $i < intdiv($out, 65536); $i++) {
    echo $chunk;
    flush();
}
$in = fopen('php://input', 'rb');
$length = 0;
while (!feof($in)) {
    $c = fread($in, 65536);
    if ($c === false || $c === '') {
        break;
    }
    $length += strlen($c);
}
echo "\nread $length\n";
