<?php
// Three separate Set-Cookie headers (a=1, b=2, c=3): they must reach the client as three
// header lines, never joined with commas.
header('Set-Cookie: a=1', false);
header('Set-Cookie: b=2', false);
header('Set-Cookie: c=3', false);
header('Content-Type: text/plain');
echo "cookies\n";
