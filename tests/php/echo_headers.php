<?php
// The request headers as PHP sees them (rebuilt by getallheaders() from the HTTP_*
// params, plus Content-Type/-Length), as a JSON object.
header('Content-Type: application/json');
echo json_encode(getallheaders(), JSON_UNESCAPED_SLASHES | JSON_INVALID_UTF8_SUBSTITUTE);
