<?php
// Sends a header and part of a body, then exit(): the response must still end cleanly.
header('X-Exit: early');
header('Content-Type: text/plain');
echo "before exit\n";
exit;
echo "never printed\n";
