<?php
// Writes to both kinds of "stderr" a PHP app has, then answers "ok":
// - error_log(): with no error_log ini set, PHP-FPM sends it to the proxy as FCGI_STDERR;
// - php://stderr: the worker's own fd 2, which FPM (catch_workers_output) puts in its log.
error_log('fixture stderr line');
file_put_contents('php://stderr', "fixture php-stderr line\n");
header('Content-Type: text/plain');
echo "ok";
