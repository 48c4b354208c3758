<?php
// Echoes the CGI/FastCGI environment PHP-FPM built from fpmgate's params, as JSON.
// Tests assert on SCRIPT_NAME, PATH_INFO, REQUEST_URI, HTTP_* etc. Invalid UTF-8 in a
// header is substituted rather than making json_encode() fail silently.
header('Content-Type: application/json');
echo json_encode($_SERVER, JSON_UNESCAPED_SLASHES | JSON_INVALID_UTF8_SUBSTITUTE);
