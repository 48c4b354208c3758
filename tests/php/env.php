<?php
// env.php?name=APP_POOL prints one FPM pool environment variable: tests tell pools apart
// by the env[] value each FPM master was started with.
header('Content-Type: text/plain');
echo getenv($_GET['name'] ?? 'APP_POOL');
