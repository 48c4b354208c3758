use super::*;

fn vhost(hosts: &[&str], pool: usize, routes: Vec<(RouteMatch, usize)>) -> VhostRoutes {
    VhostRoutes {
        hosts: hosts.iter().map(|h| h.to_string()).collect(),
        pool,
        routes,
    }
}

fn re(s: &str) -> RouteMatch {
    RouteMatch::Regex(regex::Regex::new(s).expect("test regex"))
}

fn prefix(s: &str) -> RouteMatch {
    RouteMatch::Prefix(s.to_string())
}

/// The spec's example: shop (exact + wildcard) with two routes, a default.
fn shop_router() -> Router {
    Router::new(vec![
        vhost(
            &["shop.example.com", "*.shop.example.com"],
            0,
            vec![(prefix("/legacy/"), 1), (re("^/api/v1/"), 2)],
        ),
        vhost(&["*.example.com"], 3, vec![]),
        vhost(&["*"], 4, vec![]),
        vhost(&["a.example.com"], 5, vec![]),
    ])
}

#[test]
fn exact_beats_wildcard_beats_default() {
    let r = shop_router();
    assert_eq!(r.route("shop.example.com", "/"), Some((0, 0)));
    // Exact name of a later vhost still beats the wildcard of an earlier one.
    assert_eq!(r.route("a.example.com", "/"), Some((3, 5)));
    assert_eq!(r.route("b.example.com", "/"), Some((1, 3)));
    assert_eq!(r.route("other.org", "/"), Some((2, 4)));
}

#[test]
fn longest_wildcard_wins() {
    let r = shop_router();
    assert_eq!(r.route("a.shop.example.com", "/"), Some((0, 0)));
    assert_eq!(r.route("x.y.shop.example.com", "/"), Some((0, 0)));
    // `*.example.com` covers anything else under example.com.
    assert_eq!(r.route("x.y.example.com", "/"), Some((1, 3)));
    // Regardless of the order the wildcards were declared in.
    let r = Router::new(vec![
        vhost(&["*.example.com"], 0, vec![]),
        vhost(&["*.shop.example.com"], 1, vec![]),
    ]);
    assert_eq!(r.route("a.shop.example.com", "/"), Some((1, 1)));
    assert_eq!(r.route("shop.example.com", "/"), Some((0, 0)));
}

#[test]
fn wildcard_does_not_match_bare_suffix() {
    let r = Router::new(vec![vhost(&["*.shop.example.com"], 0, vec![])]);
    assert_eq!(r.route("shop.example.com", "/"), None);
    assert_eq!(r.route(".shop.example.com", "/"), None);
    assert_eq!(r.route("xshop.example.com", "/"), None);
    assert_eq!(r.route("a.shop.example.com", "/"), Some((0, 0)));
}

#[test]
fn port_case_and_trailing_dot_are_ignored() {
    let r = shop_router();
    for host in [
        "shop.example.com:8443",
        "SHOP.Example.COM",
        "shop.example.com.",
        "Shop.Example.Com.:443",
    ] {
        assert_eq!(r.route(host, "/"), Some((0, 0)), "{host}");
    }
    assert_eq!(r.route("A.SHOP.EXAMPLE.COM:80", "/"), Some((0, 0)));
    assert_eq!(r.route("X.Example.Com.", "/"), Some((1, 3)));
}

#[test]
fn config_names_are_normalised_too() {
    let r = Router::new(vec![vhost(
        &["Shop.Example.com.", "*.Cdn.Example.com"],
        7,
        vec![],
    )]);
    assert_eq!(r.route("shop.example.com", "/"), Some((0, 7)));
    assert_eq!(r.route("a.cdn.example.com", "/"), Some((0, 7)));
}

#[test]
fn very_long_mixed_case_host_does_not_panic() {
    let long = format!("{}.Example.Com", "A".repeat(400));
    let r = shop_router();
    assert_eq!(r.route(&long, "/"), Some((1, 3)));
    // Non-ASCII in a host must not upset the stack-buffer lowercasing.
    assert_eq!(r.route("ÄÖ.Example.Com", "/"), Some((1, 3)));
}

#[test]
fn ipv6_hosts() {
    let r = Router::new(vec![vhost(&["[::1]"], 0, vec![]), vhost(&["*"], 1, vec![])]);
    assert_eq!(r.route("[::1]:8080", "/"), Some((0, 0)));
    assert_eq!(r.route("[::1]", "/"), Some((0, 0)));
    assert_eq!(r.route("[::2]:8080", "/"), Some((1, 1)));
    assert_eq!(r.route("[::1", "/"), Some((1, 1)));
}

#[test]
fn empty_host_goes_to_default() {
    let r = shop_router();
    assert_eq!(r.route("", "/"), Some((2, 4)));
    assert_eq!(r.route(":80", "/"), Some((2, 4)));
    let r = Router::new(vec![vhost(&["a.example"], 0, vec![])]);
    assert_eq!(r.route("", "/"), None);
}

#[test]
fn no_default_means_none() {
    let r = Router::new(vec![vhost(&["shop.example.com"], 0, vec![])]);
    assert_eq!(r.route("evil.example.com", "/"), None);
    assert_eq!(Router::new(vec![]).route("a", "/"), None);
}

#[test]
fn routes_first_match_wins_in_order() {
    let r = shop_router();
    assert_eq!(r.route("shop.example.com", "/legacy/x.php"), Some((0, 1)));
    assert_eq!(r.route("shop.example.com", "/api/v1/users"), Some((0, 2)));
    // Prefix is a plain string prefix, not a segment match (nginx `location /legacy/`).
    assert_eq!(r.route("shop.example.com", "/legacy"), Some((0, 0)));
    assert_eq!(r.route("shop.example.com", "/api/v2/users"), Some((0, 0)));
    // Earlier routes shadow later ones even when both match.
    let r = Router::new(vec![vhost(
        &["*"],
        0,
        vec![(re("^/a"), 1), (prefix("/a/b"), 2), (prefix("/"), 3)],
    )]);
    assert_eq!(r.route("x", "/a/b/c"), Some((0, 1)));
    assert_eq!(r.route("x", "/z"), Some((0, 3)));
}

#[test]
fn first_vhost_keeps_a_duplicated_name() {
    let r = Router::new(vec![
        vhost(&["dup.example", "*"], 0, vec![]),
        vhost(&["dup.example", "*"], 1, vec![]),
    ]);
    assert_eq!(r.route("dup.example", "/"), Some((0, 0)));
    assert_eq!(r.route("other", "/"), Some((0, 0)));
}

#[test]
fn strips_ports() {
    assert_eq!(host_without_port("[::1]:80"), "[::1]");
    assert_eq!(host_without_port("[::1]"), "[::1]");
    assert_eq!(host_without_port("a.b:8080"), "a.b");
    assert_eq!(host_without_port("a.b"), "a.b");
    assert_eq!(host_without_port("a.b:"), "a.b");
    assert_eq!(host_without_port("::1"), "::1");
    assert_eq!(host_without_port("[::1"), "[::1");
    assert_eq!(host_without_port(""), "");
}
