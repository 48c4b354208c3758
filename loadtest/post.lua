-- wrk script for the post-h1 scenario: a 100 KiB request body to post.php.
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/octet-stream"
wrk.body = string.rep("0123456789abcdef", 6400)
