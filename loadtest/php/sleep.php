<?php
// The saturation scenario: PHP is the bottleneck (each request holds a worker for 50 ms).
usleep(50000);
header('Content-Type: text/plain');
echo "slept\n";
