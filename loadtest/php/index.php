<?php
// Front controller for non-.php paths (the /fast/ path never reaches PHP: it goes to the
// FastCGI responder).
header('Content-Type: text/plain');
echo "index\n";
