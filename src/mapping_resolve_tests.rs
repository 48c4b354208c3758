//! `resolve`: which script runs, or which file is served, for a normalised path, with and
//! without a local tree (nginx's `try_files` and `index` in the parity setup).

use super::*;

fn tree(path: &str) -> LocalFile {
    match path {
        "/index.php" | "/uploads/evil.jpg" | "/.env" | "/robots.txt" | "/x.PHP" => LocalFile::File,
        "/.well-known/security.txt" | "/info.php" | "/.git/config" => LocalFile::File,
        "/wp-admin/index.php" | "/wp-admin/index.php/" => LocalFile::File,
        "/" | "/uploads" | "/uploads/" | "/app/" | "/wp-admin" | "/wp-admin/" => LocalFile::Dir,
        _ => LocalFile::Missing,
    }
}

fn script(script_name: &str, path_info: &str, document_uri: &str) -> Resolved {
    Resolved::Script {
        script_name: script_name.into(),
        path_info: path_info.into(),
        document_uri: document_uri.into(),
    }
}

fn front() -> Resolved {
    script("/index.php", "", "/index.php")
}

#[test]
fn resolve_with_local_tree() {
    let local: &dyn Fn(&str) -> LocalFile = &tree;
    let r = |p: &str, idx: Option<&str>| resolve(p, idx, Some(local));
    // try_files $fastcgi_script_name =404: evil.jpg exists, x.php does not.
    assert_eq!(
        r("/uploads/evil.jpg/x.php", Some("index.php")),
        Resolved::NotFound
    );
    assert_eq!(r("/missing.php", Some("index.php")), Resolved::NotFound);
    let info = script("/info.php", "/a/b", "/info.php/a/b");
    assert_eq!(r("/info.php/a/b", None), info);
    assert_eq!(r("/robots.txt", Some("index.php")), Resolved::Static);
    assert_eq!(r("/uploads/evil.jpg", None), Resolved::Static);
    assert_eq!(r("/.well-known/security.txt", None), Resolved::Static);
    // Dotfiles are never static: front controller, or 404 without one.
    assert_eq!(r("/.env", Some("index.php")), front());
    assert_eq!(r("/.env", None), Resolved::NotFound);
    assert_eq!(r("/.git/config", None), Resolved::NotFound);
    // x.PHP is not a script (case-sensitive split) and never static.
    assert_eq!(r("/x.PHP", Some("index.php")), front());
    assert_eq!(r("/x.PHP", None), Resolved::NotFound);
    // Directories and unknown paths go to the front controller.
    assert_eq!(r("/", Some("index.php")), front());
    assert_eq!(r("/app/", Some("index.php")), front());
    assert_eq!(r("/app/page", Some("/index.php")), front());
    assert_eq!(r("/app/page", None), Resolved::NotFound);
    // A directory with its own index script runs it when asked for with its slash
    // (WordPress's /wp-admin/); without the slash the front controller answers (WordPress
    // redirects to the slash). Without `index`, neither.
    let own = script("/wp-admin/index.php", "", "/wp-admin/index.php");
    assert_eq!(r("/wp-admin/", Some("index.php")), own);
    assert_eq!(r("/wp-admin", Some("index.php")), front());
    assert_eq!(r("/wp-admin/", None), Resolved::NotFound);
    assert_eq!(r("/uploads/", Some("index.php")), front());
    assert_eq!(r("/wp-admin/", Some("app/index.php")), Resolved::NotFound);
    // A front controller missing from the tree is a 404, as nginx's PHP
    // location try_files gives after the internal redirect.
    assert_eq!(r("/app/page", Some("missing.php")), Resolved::NotFound);
}

#[test]
fn resolve_without_local_tree() {
    let evil = "/uploads/evil.jpg/x.php";
    assert_eq!(resolve(evil, None, None), script(evil, "", evil));
    assert_eq!(resolve("/.env", Some("index.php"), None), front());
    assert_eq!(resolve("/robots.txt", None, None), Resolved::NotFound);
    // The front controller must itself be a .php script.
    assert_eq!(resolve("/x", Some("index.html"), None), Resolved::NotFound);
    assert_eq!(resolve("/x", Some(""), None), Resolved::NotFound);
    assert_eq!(resolve("/x", Some("index.php/x"), None), Resolved::NotFound);
    assert_eq!(resolve("/x", Some("../x.php"), None), Resolved::NotFound);
    assert_eq!(resolve("/x", Some("a//x.php"), None), Resolved::NotFound);
    let nested = script("/app/index.php", "", "/app/index.php");
    assert_eq!(resolve("/x", Some("app/index.php"), None), nested);
}
