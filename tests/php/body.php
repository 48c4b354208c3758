<?php
// Reports what PHP received as the request body, so tests can compare with what they sent.
// php://input is streamed (constant memory even for large bodies). For
// multipart/form-data PHP consumes the body itself: php://input is then empty and the
// uploads appear under "files" (md5 of each temp file's content).
$in = fopen('php://input', 'rb');
$ctx = hash_init('md5');
$length = 0;
while (!feof($in)) {
    $chunk = fread($in, 65536);
    if ($chunk === false || $chunk === '') {
        break;
    }
    $length += strlen($chunk);
    hash_update($ctx, $chunk);
}

// $_FILES nests arrays for fields named like "f[]"; flatten to one entry per file.
function describe_files(array $files): array
{
    $out = [];
    foreach ($files as $field => $f) {
        if (is_array($f['name'])) {
            foreach (array_keys($f['name']) as $i) {
                $out[] = describe_file("{$field}[{$i}]", $f['name'][$i], $f['tmp_name'][$i], $f['size'][$i], $f['error'][$i]);
            }
        } else {
            $out[] = describe_file($field, $f['name'], $f['tmp_name'], $f['size'], $f['error']);
        }
    }
    return $out;
}

function describe_file(string $field, string $name, string $tmp, int $size, int $error): array
{
    return [
        'field' => $field,
        'name' => $name,
        'size' => $size,
        'md5' => ($error === UPLOAD_ERR_OK && $tmp !== '') ? md5_file($tmp) : null,
        'error' => $error,
    ];
}

header('Content-Type: application/json');
echo json_encode([
    'method' => $_SERVER['REQUEST_METHOD'],
    'length' => $length,
    'md5' => hash_final($ctx),
    'content_length' => $_SERVER['CONTENT_LENGTH'] ?? null,
    'content_type' => $_SERVER['CONTENT_TYPE'] ?? null,
    'post' => (object) $_POST,  // {} rather than [] when empty
    'files' => describe_files($_FILES),
], JSON_UNESCAPED_SLASHES | JSON_INVALID_UTF8_SUBSTITUTE);
