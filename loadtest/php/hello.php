<?php
// The smallest useful PHP response: what a proxy adds on top of one PHP request.
header('Content-Type: text/plain');
echo "Hello, PHP\n";
