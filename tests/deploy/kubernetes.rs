//! The Kubernetes manifests: structurally sound, cross-referenced (selectors, port names,
//! volumes, probes, grace periods, capacity arithmetic), passing `kubernetes-validate` and
//! `kubectl kustomize` where those tools are installed, and the fpmgate config in the
//! ConfigMap passing `fpmgate check`.

use super::*;

const K8S_DIR: &str = "deploy/kubernetes";

/// Every manifest file (not the kustomization) with its documents.
fn k8s_files() -> BTreeMap<String, Vec<Value>> {
    let mut files = BTreeMap::new();
    for entry in fs::read_dir(repo().join(K8S_DIR)).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        if name.ends_with(".yaml") && name != "kustomization.yaml" {
            let docs = yaml_docs(&read(&format!("{K8S_DIR}/{name}")), &name);
            files.insert(name, docs);
        }
    }
    files
}

pub(super) fn k8s_docs() -> Vec<Value> {
    k8s_files().into_values().flatten().collect()
}

pub(super) fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} named {name} in {K8S_DIR}"))
}

/// `(ConfigMap/name key, text)` of every ConfigMap entry that is an fpmgate config.
pub(super) fn k8s_fpmgate_configs() -> Vec<(String, String)> {
    let mut out = Vec::new();
    for d in k8s_docs().iter().filter(|d| d["kind"] == "ConfigMap") {
        let name = s(&d["metadata"]["name"], "ConfigMap name");
        for (key, value) in d["data"].as_object().into_iter().flatten() {
            let text = s(value, key);
            let looks_like_fpmgate = key.ends_with(".yaml")
                && yaml(text, key).get("pools").is_some_and(|p| !p.is_null());
            if looks_like_fpmgate {
                out.push((format!("ConfigMap/{name} {key}"), text.to_string()));
            }
        }
    }
    out
}

fn pod_spec(deploy: &Value) -> &Value {
    &deploy["spec"]["template"]["spec"]
}

fn container_ports(pod: &Value) -> BTreeMap<String, u64> {
    let mut ports = BTreeMap::new();
    for c in arr(&pod["containers"], "containers") {
        for p in c["ports"].as_array().into_iter().flatten() {
            if let Some(name) = p["name"].as_str() {
                ports.insert(name.to_string(), n(&p["containerPort"], "containerPort"));
            }
        }
    }
    ports
}

fn labels_match(selector: &Value, labels: &Value) -> bool {
    let sel = selector.as_object().expect("selector is a mapping");
    !sel.is_empty() && sel.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// The Deployment whose Pods the selector picks; exactly one must match.
fn selected<'a>(docs: &'a [Value], selector: &Value, who: &str) -> &'a Value {
    let matching: Vec<&Value> = docs
        .iter()
        .filter(|d| d["kind"] == "Deployment")
        .filter(|d| labels_match(selector, &d["spec"]["template"]["metadata"]["labels"]))
        .collect();
    assert_eq!(
        matching.len(),
        1,
        "{who}: selector {selector} must pick exactly one Deployment's Pods"
    );
    matching[0]
}

/// Seconds a `preStop` `sleep N` takes, 0 without one.
fn prestop_sleep(container: &Value) -> u64 {
    let pre = &container["lifecycle"]["preStop"];
    if let Some(secs) = pre["sleep"]["seconds"].as_u64() {
        return secs;
    }
    match pre["exec"]["command"].as_array() {
        Some(cmd) => {
            let words: Vec<&str> = cmd.iter().map(|w| s(w, "preStop command")).collect();
            assert!(
                words.len() == 2 && words[0].ends_with("sleep"),
                "preStop is expected to be a plain `sleep N`: {words:?}"
            );
            words[1].parse().expect("sleep seconds")
        }
        None => 0,
    }
}

#[test]
fn kubernetes_documents_are_complete_and_namespace_agnostic() {
    let files = k8s_files();
    assert!(files.len() >= 2, "manifests missing in {K8S_DIR}");
    for (file, docs) in &files {
        assert!(!docs.is_empty(), "{file} has no documents");
        for (i, d) in docs.iter().enumerate() {
            let at = format!("{file} document {i}");
            assert!(
                d["apiVersion"].as_str().is_some_and(|v| !v.is_empty()),
                "{at}: no apiVersion"
            );
            assert!(
                d["kind"].as_str().is_some_and(|v| !v.is_empty()),
                "{at}: no kind"
            );
            assert!(
                d["metadata"]["name"]
                    .as_str()
                    .is_some_and(|v| !v.is_empty()),
                "{at}: no metadata.name"
            );
            assert!(
                d["metadata"].get("namespace").is_none(),
                "{at}: manifests must not pin a namespace"
            );
        }
    }
    // Names are unique per kind.
    let docs = k8s_docs();
    let mut seen = std::collections::HashSet::new();
    for d in &docs {
        let key = (d["kind"].to_string(), d["metadata"]["name"].to_string());
        assert!(seen.insert(key.clone()), "duplicate {key:?}");
    }
    // The kustomization lists exactly the manifest files.
    let kustomization = yaml(
        &read(&format!("{K8S_DIR}/kustomization.yaml")),
        "kustomization",
    );
    let mut listed: Vec<&str> = arr(&kustomization["resources"], "resources")
        .iter()
        .map(|r| s(r, "resource"))
        .collect();
    listed.sort_unstable();
    let files: Vec<&str> = files.keys().map(String::as_str).collect();
    assert_eq!(
        listed, files,
        "kustomization.yaml resources vs files in {K8S_DIR}"
    );
}

#[test]
fn kubernetes_workloads_are_wired_consistently() {
    let docs = k8s_docs();
    for d in docs.iter().filter(|d| d["kind"] == "Deployment") {
        let name = s(&d["metadata"]["name"], "name");
        let pod = pod_spec(d);
        assert!(
            labels_match(
                &d["spec"]["selector"]["matchLabels"],
                &d["spec"]["template"]["metadata"]["labels"]
            ),
            "Deployment {name}: selector does not match its own Pod labels"
        );
        let ports = container_ports(pod);
        let volumes: BTreeMap<&str, &Value> = pod["volumes"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|v| (s(&v["name"], "volume name"), v))
            .collect();
        for c in arr(&pod["containers"], "containers") {
            for probe in ["readinessProbe", "livenessProbe", "startupProbe"] {
                let p = &c[probe];
                for port in [&p["httpGet"]["port"], &p["tcpSocket"]["port"]] {
                    if let Some(port) = port.as_str() {
                        assert!(
                            ports.contains_key(port),
                            "{name} {probe}: no port named {port}"
                        );
                    }
                }
            }
            for m in c["volumeMounts"].as_array().into_iter().flatten() {
                let vol = s(&m["name"], "volumeMount name");
                // subPath mounts freeze one version of a ConfigMap file: updates never
                // arrive, so config reloads would silently stop working.
                assert!(
                    m.get("subPath").is_none(),
                    "{name}: volumeMount {vol} uses subPath"
                );
                let v = volumes
                    .get(vol)
                    .unwrap_or_else(|| panic!("{name}: volumeMount {vol} has no volume"));
                if let Some(cm) = v["configMap"]["name"].as_str() {
                    find(&docs, "ConfigMap", cm);
                }
            }
            // Deletion: the preStop sleep and the process' own drain both fit in the
            // grace period. For fpmgate the drain is its shutdown_grace.
            let grace = n(
                &pod["terminationGracePeriodSeconds"],
                "terminationGracePeriodSeconds",
            );
            assert!(
                prestop_sleep(c) < grace,
                "{name}: the preStop sleep uses up terminationGracePeriodSeconds"
            );
        }
    }

    // fpmgate itself.
    let deploy = find(&docs, "Deployment", "fpmgate");
    let pod = pod_spec(deploy);
    let container = &arr(&pod["containers"], "containers")[0];
    let ports = container_ports(pod);
    assert_eq!(deploy["spec"]["replicas"], 2);
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(container["readinessProbe"]["httpGet"]["port"], "admin");
    assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(container["livenessProbe"]["httpGet"]["port"], "admin");
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(container["securityContext"]["readOnlyRootFilesystem"], true);
    assert!(
        container["resources"]["requests"]["cpu"].is_string(),
        "the CPU autoscaler needs a CPU request"
    );
    let mounts: BTreeMap<&str, &str> = arr(&container["volumeMounts"], "volumeMounts")
        .iter()
        .map(|m| (s(&m["mountPath"], "mountPath"), s(&m["name"], "name")))
        .collect();
    let volume = |name: &str| {
        arr(&pod["volumes"], "volumes")
            .iter()
            .find(|v| v["name"] == name)
            .unwrap()
            .clone()
    };
    let config_volume = volume(
        mounts
            .get("/etc/fpmgate")
            .expect("config mounted at /etc/fpmgate"),
    );
    assert_eq!(config_volume["configMap"]["name"], "fpmgate-config");
    let tmp_volume = volume(mounts.get("/tmp").expect("writable /tmp for body spooling"));
    assert!(
        tmp_volume.get("emptyDir").is_some(),
        "/tmp must be an emptyDir"
    );

    // The embedded config agrees with the Pod: listener and admin ports, a reachable
    // admin bind, and a grace period that covers preStop + shutdown_grace.
    let cm = find(&docs, "ConfigMap", "fpmgate-config");
    let config = yaml(
        s(&cm["data"]["fpmgate.yaml"], "fpmgate.yaml"),
        "fpmgate.yaml",
    );
    let admin = s(&config["admin"]["bind"], "admin.bind");
    assert!(
        admin.starts_with("0.0.0.0:"),
        "admin must bind all interfaces in a Pod (probes and Prometheus use the Pod IP): {admin}"
    );
    let port_of = |bind: &str| -> u64 { bind.rsplit(':').next().unwrap().parse().unwrap() };
    assert_eq!(Some(&port_of(admin)), ports.get("admin"), "admin port");
    for l in arr(&config["listen"], "listen") {
        let bind = s(&l["bind"], "bind");
        let want = if l.get("tls").is_some() {
            "https"
        } else {
            "http"
        };
        assert_eq!(
            Some(&port_of(bind)),
            ports.get(want),
            "listener {bind} vs port {want}"
        );
    }
    let grace = n(
        &pod["terminationGracePeriodSeconds"],
        "terminationGracePeriodSeconds",
    );
    let shutdown = duration(s(&config["shutdown_grace"], "shutdown_grace")).as_secs();
    assert!(
        prestop_sleep(container) + shutdown < grace,
        "terminationGracePeriodSeconds {grace} must exceed preStop sleep + shutdown_grace {shutdown}s"
    );

    // Services select one Deployment each and name its ports.
    for svc in docs.iter().filter(|d| d["kind"] == "Service") {
        let name = s(&svc["metadata"]["name"], "Service name");
        let target = selected(&docs, &svc["spec"]["selector"], &format!("Service {name}"));
        let ports = container_ports(pod_spec(target));
        for p in arr(&svc["spec"]["ports"], "ports") {
            if let Some(tp) = p["targetPort"].as_str() {
                assert!(
                    ports.contains_key(tp),
                    "Service {name}: no container port {tp}"
                );
            }
        }
    }
    let svc = find(&docs, "Service", "fpmgate");
    let svc_ports: Vec<&Value> = arr(&svc["spec"]["ports"], "ports")
        .iter()
        .map(|p| &p["targetPort"])
        .collect();
    assert!(
        svc_ports.contains(&&Value::from("http")) && svc_ports.contains(&&Value::from("https"))
    );
    assert!(
        !svc_ports.contains(&&Value::from("admin")),
        "the admin port stays out of the Service"
    );

    let pdb = find(&docs, "PodDisruptionBudget", "fpmgate");
    assert_eq!(pdb["apiVersion"], "policy/v1");
    assert_eq!(pdb["spec"]["minAvailable"], 1);
    assert_eq!(
        s(
            &selected(&docs, &pdb["spec"]["selector"]["matchLabels"], "PDB")["metadata"]["name"],
            "name"
        ),
        "fpmgate"
    );

    let hpa = find(&docs, "HorizontalPodAutoscaler", "fpmgate");
    assert_eq!(hpa["apiVersion"], "autoscaling/v2");
    let target = &hpa["spec"]["scaleTargetRef"];
    find(
        &docs,
        s(&target["kind"], "kind"),
        s(&target["name"], "name"),
    );
    let cpu = arr(&hpa["spec"]["metrics"], "metrics")
        .iter()
        .find(|m| m["resource"]["name"] == "cpu")
        .expect("a CPU metric");
    assert_eq!(cpu["resource"]["target"]["averageUtilization"], 70);

    let pm = find(&docs, "PodMonitor", "fpmgate");
    assert_eq!(pm["apiVersion"], "monitoring.coreos.com/v1");
    let target = selected(&docs, &pm["spec"]["selector"]["matchLabels"], "PodMonitor");
    let ports = container_ports(pod_spec(target));
    for e in arr(&pm["spec"]["podMetricsEndpoints"], "podMetricsEndpoints") {
        assert!(
            ports.contains_key(s(&e["port"], "port")),
            "PodMonitor port {}",
            e["port"]
        );
        assert_eq!(e["path"], "/metrics");
    }
}

/// The fpmgate config finds the example FPM Pods through their headless Service (one
/// endpoint per Pod, so each is balanced, pinged and ejected on its own), and its
/// max_conns follows the capacity rule: replicas × max_conns never exceeds one Pod's
/// workers.
#[test]
fn kubernetes_fpm_backend_matches_fpmgate_config() {
    let docs = k8s_docs();
    let config = yaml(
        s(
            &find(&docs, "ConfigMap", "fpmgate-config")["data"]["fpmgate.yaml"],
            "fpmgate.yaml",
        ),
        "fpmgate.yaml",
    );
    let svc = find(&docs, "Service", "php-fpm");
    assert_eq!(
        svc["spec"]["clusterIP"], "None",
        "the php-fpm Service is headless: its name resolves to the Pods"
    );
    let svc_ports: Vec<u64> = arr(&svc["spec"]["ports"], "ports")
        .iter()
        .map(|p| n(&p["port"], "port"))
        .collect();

    let fpm = find(&docs, "Deployment", "php-fpm");
    let pool_conf = s(
        &find(&docs, "ConfigMap", "php-fpm-pool")["data"]["www.conf"],
        "www.conf",
    );
    let setting = |key: &str| -> String {
        pool_conf
            .lines()
            .filter_map(|l| l.split_once('='))
            .find(|(k, _)| k.trim() == key)
            .map(|(_, v)| v.trim().to_string())
            .unwrap_or_else(|| panic!("www.conf sets no {key}"))
    };
    assert_eq!(setting("ping.path"), "/ping");
    assert_eq!(setting("security.limit_extensions"), ".php");
    assert_eq!(setting("php_admin_value[cgi.fix_pathinfo]"), "0");
    assert!(n(&fpm["spec"]["replicas"], "php-fpm replicas") >= 2);
    let workers: u64 = setting("pm.max_children").parse().unwrap();
    let max_replicas = n(
        &find(&docs, "HorizontalPodAutoscaler", "fpmgate")["spec"]["maxReplicas"],
        "maxReplicas",
    );

    let pools = config["pools"].as_object().expect("pools");
    for (name, pool) in pools {
        let mut total = 0;
        for e in arr(&pool["endpoints"], "endpoints") {
            let addr = s(&e["addr"], "addr");
            let (host, port) = addr.rsplit_once(':').unwrap();
            assert_eq!(
                host, "dns:php-fpm",
                "pool {name}: endpoint {addr} is not the php-fpm Service's name"
            );
            assert!(
                svc_ports.contains(&port.parse().unwrap()),
                "{addr}: no such Service port"
            );
            total += e["max_conns"].as_u64().unwrap_or(16);
        }
        assert!(
            total * max_replicas <= workers,
            "pool {name}: {max_replicas} replicas × max_conns {total} > {workers} workers per FPM Pod"
        );
        assert_ne!(
            pool["health"]["passive"]["fails"], 0,
            "one endpoint per Pod: passive ejection takes out only the failing one"
        );
        if let Some(path) = pool["status"].as_str() {
            assert_eq!(path, setting("pm.status_path"), "pool {name}: status");
        }
        if let Some(port) = pool["health"]["addr_port"].as_u64() {
            assert!(
                svc_ports.contains(&port),
                "health.addr_port {port} is not a Service port"
            );
            let status_listen = setting("pm.status_listen");
            assert!(
                status_listen == port.to_string() || status_listen.ends_with(&format!(":{port}")),
                "health.addr_port {port} vs pm.status_listen {status_listen}"
            );
        }
    }
}

#[test]
fn kubernetes_manifests_pass_schema_validation() {
    // Schemas ship inside the PyPI package, so this works offline.
    let dir = repo().join(K8S_DIR);
    let files: Vec<String> = k8s_files().into_keys().collect();
    let Some(version) = run(Command::new("kubernetes-validate").arg("--version")) else {
        return skip(
            "Kubernetes schema validation",
            "kubernetes-validate is not installed (python3 -m pip install kubernetes-validate)",
        );
    };
    eprintln!("kubernetes-validate {}", text(&version).trim());
    // The newest schemas it ships, and an older release that clusters still run.
    for k8s in [None, Some("1.28.0")] {
        let mut cmd = Command::new("kubernetes-validate");
        cmd.current_dir(&dir).args(["--strict", "--quiet"]);
        if let Some(v) = k8s {
            cmd.args(["--kubernetes-version", v]);
        }
        let out = run(cmd.args(&files)).unwrap();
        assert!(
            out.status.success(),
            "kubernetes-validate (Kubernetes {}) failed:\n{}",
            k8s.unwrap_or("latest"),
            text(&out)
        );
        // Custom resources (PodMonitor) have no bundled schema: a warning, checked by hand
        // above. Anything else it could not check is a failure.
        for line in text(&out)
            .lines()
            .filter(|l| l.contains("Couldn't find schema"))
        {
            assert!(line.contains("PodMonitor"), "unexpected: {line}");
        }
    }
}

#[test]
fn kubernetes_kustomization_builds() {
    let Some(out) = run(Command::new("kubectl")
        .args(["kustomize"])
        .arg(repo().join(K8S_DIR)))
    else {
        return skip("kustomize build", "kubectl is not installed");
    };
    assert!(
        out.status.success(),
        "kubectl kustomize failed:\n{}",
        text(&out)
    );
    let built = yaml_docs(&String::from_utf8_lossy(&out.stdout), "kustomize output");
    assert_eq!(
        built.len(),
        k8s_docs().len(),
        "kustomize dropped or added documents"
    );
}

#[test]
fn kubernetes_configmap_config_passes_check() {
    let configs = k8s_fpmgate_configs();
    assert!(
        !configs.is_empty(),
        "no fpmgate config found in the ConfigMaps"
    );
    for (what, config) in configs {
        assert_check_passes(&config, &what);
    }
}
