<?php
// A directory's own index script (WordPress's /wp-admin/index.php): says how it was reached.
header('Content-Type: application/json');
echo json_encode([
    'SCRIPT_NAME' => $_SERVER['SCRIPT_NAME'],
    'REQUEST_URI' => $_SERVER['REQUEST_URI'],
    'DOCUMENT_URI' => $_SERVER['DOCUMENT_URI'] ?? null,
], JSON_UNESCAPED_SLASHES);
