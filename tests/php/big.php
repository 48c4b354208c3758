<?php
// big.php?bytes=N outputs exactly N bytes, no Content-Length (so the proxy must stream).
// Pattern: byte i is "0123456789abcdef"[i % 16], i.e. "0123456789abcdef" repeated and cut
// at N; tests compute the expected md5 themselves. Written in 64 KiB echo chunks.
$bytes = max(0, (int) ($_GET['bytes'] ?? 0));
header('Content-Type: application/octet-stream');
$chunk = str_repeat('0123456789abcdef', 4096); // 65536 bytes, a whole number of periods
for ($left = $bytes; $left > 0; $left -= strlen($chunk)) {
    echo $left >= strlen($chunk) ? $chunk : substr($chunk, 0, $left);
}
