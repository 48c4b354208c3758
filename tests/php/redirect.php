<?php
// redirect.php?to=/x sends "Location: /x". With no explicit status PHP itself turns the
// response into a 302, as for any app that only sets Location; ?code=301 forces one.
$to = $_GET['to'] ?? '/';
if (isset($_GET['code'])) {
    http_response_code((int) $_GET['code']);
}
header('Location: ' . $to);
echo "redirecting to $to\n";
