<?php
// Reads the whole request body and answers with its length and a checksum, so a proxy
// that truncates or corrupts a body shows in the response.
$body = file_get_contents('php://input');
header('Content-Type: text/plain');
echo strlen($body), ' ', crc32($body), "\n";
