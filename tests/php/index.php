<?php
// Front controller: same output as server.php plus "_front": true, so tests can tell that
// a non-.php path was routed to index.php (SCRIPT_NAME=/index.php, REQUEST_URI kept).
header('Content-Type: application/json');
echo json_encode($_SERVER + ['_front' => true], JSON_UNESCAPED_SLASHES | JSON_INVALID_UTF8_SUBSTITUTE);
