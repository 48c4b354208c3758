<?php
// A 1 MiB response, written in 64 KiB chunks as a real script would stream it.
header('Content-Type: application/octet-stream');
header('Content-Length: 1048576');
$chunk = str_repeat('0123456789abcdef', 4096); // 64 KiB
for ($i = 0; $i < 16; $i++) {
    echo $chunk;
}
