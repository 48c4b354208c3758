<?php
// fpmgate local demo page: shows which FPM pool ran it and the CGI params fpmgate sent.
// It is also the front controller (vhost `index: index.php`), so any path that is not a
// file lands here with REQUEST_URI intact. Deliberately no phpinfo(): never ship one.
declare(strict_types=1);

function h(?string $s): string
{
    return htmlspecialchars($s ?? '', ENT_QUOTES | ENT_SUBSTITUTE, 'UTF-8');
}

$pool = getenv('APP_POOL') ?: 'unknown';
$rows = [
    'SCRIPT_NAME' => $_SERVER['SCRIPT_NAME'] ?? null,
    'PATH_INFO' => $_SERVER['PATH_INFO'] ?? null,
    'REQUEST_URI' => $_SERVER['REQUEST_URI'] ?? null,
    'HTTP_HOST' => $_SERVER['HTTP_HOST'] ?? null,
    'SERVER_PROTOCOL' => $_SERVER['SERVER_PROTOCOL'] ?? null,
    'REMOTE_ADDR' => $_SERVER['REMOTE_ADDR'] ?? null,
    'APP_ENV' => $_SERVER['APP_ENV'] ?? null,
    'worker pid' => (string) getmypid(),
    'time' => date('Y-m-d H:i:s T'),
];
?>
<!doctype html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <title>fpmgate demo: <?= h($pool) ?></title>
  <link rel="stylesheet" href="/style.css">
</head>
<body>
  <h1>Served by pool <?= h($pool) ?> (PHP <?= h(PHP_VERSION) ?>) via fpmgate</h1>
  <table>
<?php foreach ($rows as $name => $value): ?>
    <tr><th><?= h($name) ?></th><td><?= h($value) ?></td></tr>
<?php endforeach; ?>
  </table>
  <p>Try <a href="/some/route?x=1">/some/route?x=1</a> (front controller),
     <a href="/index.php/extra/path">/index.php/extra/path</a> (PATH_INFO), and the other
     pool on <a href="http://b.localhost:8080/">b.localhost</a>.</p>
</body>
</html>
