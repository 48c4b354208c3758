<?php
// stream.php?n=5&ms=200 prints n lines "tick I T" (T = microtime when printed), flushing
// each and sleeping ms between them: a proxy that buffers delivers them all at once.
// ?sse=1 sends them as server-sent events ("data: tick I T" + blank line).
$n = max(0, (int) ($_GET['n'] ?? 5));
$ms = max(0, (int) ($_GET['ms'] ?? 200));
$sse = !empty($_GET['sse']);
header($sse ? 'Content-Type: text/event-stream' : 'Content-Type: text/plain');
header('Cache-Control: no-cache');
while (ob_get_level()) {
    ob_end_flush();
}
ob_implicit_flush(true);
for ($i = 0; $i < $n; $i++) {
    $line = sprintf('tick %d %.6f', $i, microtime(true));
    echo $sse ? "data: $line\n\n" : "$line\n";
    flush();
    if ($i < $n - 1) {
        usleep($ms * 1000);
    }
}
