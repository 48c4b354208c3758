<?php
// length.php?declared=2&body=hello: a script whose Content-Length header is wrong.
header('Content-Type: text/plain');
header('Content-Length: ' . (int) ($_GET['declared'] ?? 0));
echo $_GET['body'] ?? '';
