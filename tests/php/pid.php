<?php
// The worker's pid: tells which worker (and, with max_requests, which generation) served.
header('Content-Type: text/plain');
echo getmypid();
