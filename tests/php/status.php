<?php
// status.php?code=418 answers with that status (PHP emits a "Status:" CGI header).
// No body for statuses that must not have one (1xx, 204, 304).
$code = (int) ($_GET['code'] ?? 200);
http_response_code($code);
header('Content-Type: text/plain');
if ($code >= 200 && $code !== 204 && $code !== 304) {
    echo "status $code\n";
}
