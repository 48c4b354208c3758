<?php
// Notes that it ran (one line appended to ?log=FILE), then kills its own worker before any
// output, as request_terminate_timeout, a segfault or the OOM killer would.
file_put_contents($_GET['log'], "ran\n", FILE_APPEND);
posix_kill(getmypid(), 9);
