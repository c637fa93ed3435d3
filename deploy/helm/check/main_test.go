package main

import (
	"strings"
	"testing"
)

// A minimal chart output that passes every rule; each case below breaks one thing.
const good = `
apiVersion: v1
kind: Service
metadata: {name: edgelog-loader, labels: {app: loader}}
spec:
  clusterIP: None
  selector: {app: loader}
  ports: [{name: metrics, port: 9103, targetPort: metrics}]
---
apiVersion: policy/v1
kind: PodDisruptionBudget
metadata: {name: edgelog-loader}
spec: {maxUnavailable: 1, selector: {matchLabels: {app: loader}}}
---
apiVersion: apps/v1
kind: StatefulSet
metadata: {name: edgelog-loader}
spec:
  serviceName: edgelog-loader
  replicas: 2
  selector: {matchLabels: {app: loader}}
  template:
    metadata: {labels: {app: loader}}
    spec:
      enableServiceLinks: false
      terminationGracePeriodSeconds: 30
      securityContext: {runAsNonRoot: true}
      containers:
        - name: loader
          image: edgelog:0.1.0
          command: [loader]
          ports: [{name: metrics, containerPort: 9103}]
          env:
            - {name: EDGELOG_LOADER__METRICS_LISTEN, value: "0.0.0.0:9103"}
            - {name: EDGELOG_KAFKA__OPTIONS__SECURITY_PROTOCOL, value: SASL_SSL}
            - name: EDGELOG_CLICKHOUSE__PASSWORD
              valueFrom: {secretKeyRef: {name: s, key: clickhouse-password}}
          livenessProbe: {httpGet: {path: /healthz, port: metrics}}
          readinessProbe: {httpGet: {path: /readyz, port: metrics}}
          resources: {requests: {cpu: 100m, memory: 64Mi}, limits: {memory: 256Mi}}
          securityContext:
            allowPrivilegeEscalation: false
            readOnlyRootFilesystem: true
            capabilities: {drop: [ALL]}
---
apiVersion: batch/v1
kind: Job
metadata:
  name: edgelog-setup
  annotations: {helm.sh/hook: "pre-install,pre-upgrade"}
spec:
  template:
    spec:
      enableServiceLinks: false
      restartPolicy: Never
      securityContext: {runAsNonRoot: true}
      containers:
        - name: setup
          image: edgelog:0.1.0
          command: [edgelog, setup]
          resources: {requests: {cpu: 50m, memory: 64Mi}, limits: {memory: 256Mi}}
          securityContext:
            allowPrivilegeEscalation: false
            readOnlyRootFilesystem: true
            capabilities: {drop: [ALL]}
`

func problems(manifest string) []string {
	objs, p := Decode(strings.NewReader(manifest))
	if len(p) > 0 {
		return p
	}
	return Check(objs, map[string]bool{"loader.metrics_listen": true, "clickhouse.password": true})
}

func TestGoodManifestPasses(t *testing.T) {
	if p := problems(good); len(p) > 0 {
		t.Fatalf("want no problems, got %q", p)
	}
}

func TestEachBreakageIsFound(t *testing.T) {
	cases := []struct{ name, old, new, want string }{
		{"unknown field", "serviceName: edgelog-loader", "serviceName: edgelog-loader\n  servicename: x", `unknown field "spec.servicename"`},
		{"wrong type", "replicas: 2", `replicas: "2"`, "replicas"},
		{"unknown kind", "kind: PodDisruptionBudget", "kind: PodDisruptionBudgett", "no kind"},
		{"duplicate key", "replicas: 2", "replicas: 2\n  replicas: 3", "already set"},
		{"no liveness probe", "livenessProbe: {httpGet: {path: /healthz, port: metrics}}", "", "no HTTP livenessProbe"},
		{"probe on the wrong path", "path: /readyz", "path: /healthz", "readinessProbe on /healthz"},
		{"probe on a port the stage does not listen on", `"0.0.0.0:9103"`, `"127.0.0.1:9103"`, "listens on"},
		{"service links on", "enableServiceLinks: false\n      terminationGracePeriodSeconds", "terminationGracePeriodSeconds", "enableServiceLinks"},
		{"root filesystem writable", "readOnlyRootFilesystem: true\n            capabilities: {drop: [ALL]}\n---", "capabilities: {drop: [ALL]}\n---", "readOnlyRootFilesystem"},
		{"capabilities kept", "drop: [ALL]}\n---", "drop: [NET_RAW]}\n---", "drop ALL"},
		{"setup not a hook", `helm.sh/hook: "pre-install,pre-upgrade"`, `helm.sh/hook: "post-install"`, "want pre-install and pre-upgrade"},
		{"no PDB", "kind: PodDisruptionBudget\nmetadata: {name: edgelog-loader}\nspec: {maxUnavailable: 1, selector: {matchLabels: {app: loader}}}", "kind: PodDisruptionBudget\nmetadata: {name: edgelog-loader}\nspec: {maxUnavailable: 1, selector: {matchLabels: {app: other}}}", "covered by 0"},
		{"not headless", "clusterIP: None", "clusterIP: 10.0.0.1", "not headless"},
		{"unknown config section", "EDGELOG_KAFKA__OPTIONS__SECURITY_PROTOCOL", "EDGELOG_KAFKAA__BROKERS", "not a configuration section"},
		{"unknown config key", "EDGELOG_LOADER__METRICS_LISTEN, value", "EDGELOG_LOADER__METRICS_LISTENN, value", "not a key"},
		{"password in plain env", "valueFrom: {secretKeyRef: {name: s, key: clickhouse-password}}", "value: hunter2", "not taken from a Secret"},
		{"no memory limit", "limits: {memory: 256Mi}}\n          securityContext:\n            allowPrivilegeEscalation: false\n            readOnlyRootFilesystem: true\n            capabilities: {drop: [ALL]}\n---\napiVersion: batch/v1", "}\n          securityContext:\n            allowPrivilegeEscalation: false\n            readOnlyRootFilesystem: true\n            capabilities: {drop: [ALL]}\n---\napiVersion: batch/v1", "no memory limit"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			if !strings.Contains(good, c.old) {
				t.Fatalf("the fixture has no %q", c.old)
			}
			p := problems(strings.Replace(good, c.old, c.new, 1))
			if !strings.Contains(strings.Join(p, "\n"), c.want) {
				t.Fatalf("want a problem containing %q, got %q", c.want, p)
			}
		})
	}
}

// The setup hook runs before the release's plain objects exist: a Secret of the chart that it
// reads must be a hook of lower weight.
func TestSetupReadsOnlySecretsCreatedBeforeIt(t *testing.T) {
	withSecret := func(annotations string) string {
		m := strings.Replace(good, "          command: [edgelog, setup]\n",
			"          command: [edgelog, setup]\n          env:\n            - name: EDGELOG_CLICKHOUSE__PASSWORD\n              valueFrom: {secretKeyRef: {name: chart-secret, key: k}}\n", 1)
		return m + "---\napiVersion: v1\nkind: Secret\nmetadata:\n  name: chart-secret\n  annotations: " + annotations + "\nstringData: {k: v}\n"
	}
	if p := problems(withSecret(`{helm.sh/hook: "pre-install,pre-upgrade", helm.sh/hook-weight: "-10"}`)); len(p) > 0 {
		t.Fatalf("a hook Secret of lower weight: want no problems, got %q", p)
	}
	for _, a := range []string{`{}`, `{helm.sh/hook: "pre-install,pre-upgrade", helm.sh/hook-weight: "5"}`} {
		p := problems(withSecret(a))
		if !strings.Contains(strings.Join(p, "\n"), "not a hook created before it") {
			t.Fatalf("Secret annotations %s: want the ordering problem, got %q", a, p)
		}
	}
}
