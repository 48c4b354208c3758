<?php
// span.php?file=/abs/path&ms=N runs N ms (default 500) and, when it ends, appends
// "START END PID" (microtime) to the file under flock, so tests can tell how many scripts
// ran at once. It ignores user aborts: like a script doing real work, it runs to its end
// whoever is still listening. ?out=1 prints (and flushes) a line every 50 ms meanwhile.
$start = microtime(true);
$file = $_GET['file'] ?? '';
if (!is_string($file) || $file === '' || $file[0] !== '/') {
    http_response_code(400);
    echo "span.php needs ?file=/absolute/path\n";
    exit;
}
ignore_user_abort(true);
register_shutdown_function(function () use ($file, $start) {
    $fh = fopen($file, 'ab');
    flock($fh, LOCK_EX);
    fwrite($fh, sprintf("%.6f %.6f %d\n", $start, microtime(true), getmypid()));
    fflush($fh);
    flock($fh, LOCK_UN);
    fclose($fh);
});
$ms = max(0, (int) ($_GET['ms'] ?? 500));
header('Content-Type: text/plain');
if (!empty($_GET['out'])) {
    while (ob_get_level()) {
        ob_end_flush();
    }
    $end = $start + $ms / 1000;
    while (microtime(true) < $end) {
        echo str_repeat('x', 1000), "\n";
        flush();
        usleep(50000);
    }
} else {
    usleep($ms * 1000);
}
echo "done\n";
