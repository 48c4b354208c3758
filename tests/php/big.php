<?php
// big.php?bytes=N outputs exactly N bytes, no Content-Length (so the proxy must stream).
// Pattern: byte i is "0123456789abcdef"[i % 16], i.e. "0123456789abcdef" repeated and cut
// at N; tests compute the expected md5 themselves. Written in 64 KiB echo chunks.
// &length=1 declares Content-Length: N; &after_ms=M flushes everything, then keeps the
// script (and so FPM's END_REQUEST) running for M ms more.
$bytes = max(0, (int) ($_GET['bytes'] ?? 0));
$after_ms = max(0, (int) ($_GET['after_ms'] ?? 0));
header('Content-Type: application/octet-stream');
if (!empty($_GET['length'])) {
    header("Content-Length: $bytes");
}
$chunk = str_repeat('0123456789abcdef', 4096); // 65536 bytes, a whole number of periods
for ($left = $bytes; $left > 0; $left -= strlen($chunk)) {
    echo $left >= strlen($chunk) ? $chunk : substr($chunk, 0, $left);
}
if ($after_ms > 0) {
    while (ob_get_level()) {
        ob_end_flush();
    }
    flush();
    usleep($after_ms * 1000);
}
