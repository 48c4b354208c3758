//! File names never served from a `static` tree: backups and copies of PHP sources, PHP
//! templates and archives, database dumps, logs. nginx and Caddy serve whatever the tree
//! holds, so `wp-config.php.bak` hands out the database password; here it is a 404 unless
//! the vhost's `static_deny` says otherwise.

/// The patterns a vhost gets when it sets no `static_deny`.
pub const DEFAULT_DENY: &[&str] = &[
    "*.php.*", "*.php~", "*.php_*", "*.phtml", "*.phar", "*.inc", "*.bak", "*.old", "*.orig",
    "*.save", "*.swp", "*~", "*.sql", "*.sql.*", "*.log", "*.ini",
];

/// Glob patterns (`*` any run of characters, `?` one byte) on a file's name, ASCII
/// case-insensitive (`X.PHP.BAK` is the same file on a case-insensitive file system).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DenyList {
    patterns: Vec<Box<[u8]>>,
}

impl DenyList {
    /// The list of `patterns`, each already checked by [`check_pattern`].
    pub fn new<S: AsRef<str>>(patterns: &[S]) -> DenyList {
        DenyList {
            patterns: patterns
                .iter()
                .map(|p| p.as_ref().to_ascii_lowercase().into_bytes().into())
                .collect(),
        }
    }

    /// The default list.
    pub fn default_list() -> DenyList {
        DenyList::new(DEFAULT_DENY)
    }

    /// Whether the file named by the last segment of `path` is denied.
    pub fn denies(&self, path: &str) -> bool {
        let name = path.rsplit('/').next().unwrap_or(path).as_bytes();
        self.patterns.iter().any(|p| glob(p, name))
    }
}

/// Why `pattern` cannot be a `static_deny` entry, if it cannot.
pub fn check_pattern(pattern: &str) -> Result<(), &'static str> {
    if pattern.is_empty() || pattern.bytes().all(|b| b == b'*') {
        return Err("a pattern must name something: `*.bak`, not `` or `*`");
    }
    if pattern.contains('/') {
        return Err("patterns match file names, without `/`");
    }
    Ok(())
}

/// `*` and `?` matching of a lowercase pattern against a name, linear in practice: on a
/// mismatch only the last `*` is moved on.
fn glob(pattern: &[u8], name: &[u8]) -> bool {
    let (mut p, mut n) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while n < name.len() {
        match pattern.get(p) {
            Some(b'*') => {
                star = Some((p, n));
                p += 1;
            }
            Some(&c) if c == b'?' || c == name[n].to_ascii_lowercase() => {
                p += 1;
                n += 1;
            }
            _ => match star {
                Some((sp, sn)) => {
                    p = sp + 1;
                    n = sn + 1;
                    star = Some((sp, sn + 1));
                }
                None => return false,
            },
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_match_whole_names_ignoring_ascii_case() {
        let cases = [
            ("*.bak", "x.bak", true),
            ("*.bak", "X.BAK", true),
            ("*.bak", "x.bak.txt", false),
            ("*.bak", ".bak", true),
            ("*.php.*", "wp-config.php.bak", true),
            ("*.php.*", "wp-config.php", false),
            ("*.php.*", "a.php.b.php.c", true),
            ("*~", "index.php~", true),
            ("db-?.sql", "db-1.sql", true),
            ("db-?.sql", "db-12.sql", false),
            ("*a*b*c", "xaxbxc", true),
            ("*a*b*c", "xaxcxb", false),
            ("exact.txt", "exact.txt", true),
            ("exact.txt", "exact.txtx", false),
        ];
        for (pattern, name, want) in cases {
            assert_eq!(
                glob(pattern.as_bytes(), name.as_bytes()),
                want,
                "{pattern} {name}"
            );
        }
    }

    #[test]
    fn the_default_list_keeps_sources_and_dumps_and_serves_assets() {
        let d = DenyList::default_list();
        for leak in [
            "/wp-config.php.bak",
            "/wp-config.php~",
            "/config.php.save",
            "/index.php.orig",
            "/settings.PHP.swp",
            "/index.php_old",
            "/app/views/home.phtml",
            "/composer.phar",
            "/lib/db.inc",
            "/backup.sql",
            "/dump.sql.gz",
            "/error.log",
            "/php.ini",
        ] {
            assert!(d.denies(leak), "{leak}");
        }
        for asset in [
            "/style.css",
            "/app.js",
            "/logo.png",
            "/robots.txt",
            "/fonts/inter.woff2",
            "/sitemap.xml",
            "/",
        ] {
            assert!(!d.denies(asset), "{asset}");
        }
        assert!(!DenyList::new::<&str>(&[]).denies("/x.bak"));
    }

    #[test]
    fn the_readme_lists_the_default() {
        let readme = include_str!("../../README.md").replace('\n', " ");
        let listed: Vec<String> = DEFAULT_DENY.iter().map(|p| format!("`{p}`")).collect();
        assert!(readme.contains(&listed.join(", ")), "{}", listed.join(", "));
    }

    #[test]
    fn patterns_must_name_files() {
        assert!(check_pattern("*.bak").is_ok());
        assert!(check_pattern("").is_err());
        assert!(check_pattern("**").is_err());
        assert!(check_pattern("uploads/*.php").is_err());
    }
}
