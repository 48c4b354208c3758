<?php
// length.php?declared=2&body=hello: a script whose Content-Length header is wrong.
// &code=304 answers with that status anyway; &after_ms=100 flushes the body and waits
// before ending, so the response streams instead of arriving whole.
http_response_code((int) ($_GET['code'] ?? 200));
header('Content-Type: text/plain');
header('Content-Length: ' . (int) ($_GET['declared'] ?? 0));
echo $_GET['body'] ?? '';
if (isset($_GET['after_ms'])) {
    while (ob_get_level() > 0) {
        ob_end_flush();
    }
    flush();
    usleep((int) $_GET['after_ms'] * 1000);
}
