// Command check validates the output of `helm template` for the edgelog chart without a
// Kubernetes cluster (none can run where CI runs, and kubeconform's schemas cannot be downloaded
// there):
//
//  1. Schema: every object is decoded strictly into the typed Kubernetes API structs (k8s.io/api,
//     and prometheus-operator's for ServiceMonitor): an unknown or misspelt field, a duplicate
//     field, a value of the wrong type, an unknown apiVersion/kind or a missing name fails.
//  2. The chart's own rules: probes on /healthz and /readyz on the metrics port, the security
//     context, headless Services and PodDisruptionBudgets that select their StatefulSets, the
//     setup Job as a pre-install/pre-upgrade hook (and any Secret it reads created before it),
//     passwords only from Secrets, every EDGELOG_* variable in a real configuration section (and,
//     with -keys, a real key).
//
// With -env-dir, every edgelog container's environment is written there as NAME=value lines
// (Secret and downward-API values replaced by placeholders) for scripts/check-helm.sh to load
// with the real `edgelog config`.
//
// Usage: check [-keys FILE] [-env-dir DIR] RENDERED.yaml...
package main

import (
	"bufio"
	"bytes"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"

	monitoringv1 "github.com/prometheus-operator/prometheus-operator/pkg/apis/monitoring/v1"
	appsv1 "k8s.io/api/apps/v1"
	batchv1 "k8s.io/api/batch/v1"
	corev1 "k8s.io/api/core/v1"
	policyv1 "k8s.io/api/policy/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/runtime"
	kjson "k8s.io/apimachinery/pkg/runtime/serializer/json"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	"sigs.k8s.io/yaml"
)

// The sections of shared/config.rs's Settings; an EDGELOG_<SECTION>__... variable outside them
// stops every binary at start-up.
var sections = []string{"log", "kafka", "topics", "clickhouse", "producer", "anonymizer", "loader"}

// Settings that are maps of librdkafka options: any key below them is allowed.
var mapKeys = []string{"kafka.options", "producer.kafka_options", "anonymizer.kafka_options", "loader.kafka_options"}

const placeholderSecret = "chart-check-placeholder-secret"

func main() {
	keysFile := flag.String("keys", "", "file of valid configuration keys, one `section.key` a line")
	envDir := flag.String("env-dir", "", "write each edgelog container's environment here")
	flag.Parse()
	if flag.NArg() == 0 {
		fmt.Fprintln(os.Stderr, "usage: check [-keys FILE] [-env-dir DIR] RENDERED.yaml...")
		os.Exit(2)
	}
	var keys map[string]bool
	if *keysFile != "" {
		data, err := os.ReadFile(*keysFile)
		if err != nil {
			fatal(err)
		}
		keys = map[string]bool{}
		for _, line := range strings.Fields(string(data)) {
			keys[line] = true
		}
	}
	failed := false
	for _, path := range flag.Args() {
		f, err := os.Open(path)
		if err != nil {
			fatal(err)
		}
		objs, problems := Decode(f)
		f.Close()
		if len(problems) == 0 {
			problems = Check(objs, keys)
		}
		if len(problems) == 0 && *envDir != "" {
			if err := writeEnvFiles(objs, filepath.Join(*envDir, strings.TrimSuffix(filepath.Base(path), filepath.Ext(path)))); err != nil {
				fatal(err)
			}
		}
		for _, p := range problems {
			fmt.Fprintf(os.Stderr, "chart-check: %s: %s\n", path, p)
		}
		if len(problems) > 0 {
			failed = true
		} else {
			fmt.Fprintf(os.Stderr, "chart-check: %s: %d objects ok (%s)\n", path, len(objs), summary(objs))
		}
	}
	if failed {
		os.Exit(1)
	}
}

func fatal(err error) {
	fmt.Fprintln(os.Stderr, "chart-check:", err)
	os.Exit(2)
}

// Object is one decoded manifest with where it came from.
type Object struct {
	Doc int
	Obj runtime.Object
	GVK string
}

func (o Object) meta() metav1.Object {
	m, _ := o.Obj.(metav1.Object)
	return m
}

func (o Object) String() string {
	return fmt.Sprintf("%s %s (document %d)", o.GVK, o.meta().GetName(), o.Doc)
}

func newScheme() *runtime.Scheme {
	s := runtime.NewScheme()
	for _, add := range []func(*runtime.Scheme) error{
		corev1.AddToScheme, appsv1.AddToScheme, batchv1.AddToScheme, policyv1.AddToScheme,
		monitoringv1.AddToScheme,
	} {
		if err := add(s); err != nil {
			panic(err)
		}
	}
	return s
}

// Decode reads a multi-document YAML stream and decodes each object strictly into its typed
// struct. Every problem is returned, not just the first.
func Decode(r io.Reader) ([]Object, []string) {
	scheme := newScheme()
	// Strict: unknown and duplicate fields are errors, and field names are case-sensitive.
	ser := kjson.NewSerializerWithOptions(kjson.DefaultMetaFactory, scheme, scheme,
		kjson.SerializerOptions{Yaml: false, Strict: true})
	reader := utilyaml.NewYAMLReader(bufio.NewReader(r))
	var objs []Object
	var problems []string
	seen := map[string]int{}
	for doc := 1; ; doc++ {
		raw, err := reader.Read()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return objs, append(problems, fmt.Sprintf("document %d: reading: %v", doc, err))
		}
		// YAMLToJSONStrict refuses duplicate keys, which plain YAML decoding silently merges.
		js, err := yaml.YAMLToJSONStrict(raw)
		if err != nil {
			problems = append(problems, fmt.Sprintf("document %d: %v", doc, err))
			continue
		}
		if t := bytes.TrimSpace(js); len(t) == 0 || string(t) == "null" {
			continue // only comments, or an empty document between separators
		}
		obj, gvk, err := ser.Decode(js, nil, nil)
		if err != nil {
			problems = append(problems, fmt.Sprintf("document %d: %v", doc, err))
			continue
		}
		o := Object{Doc: doc, Obj: obj, GVK: gvk.GroupVersion().String() + "/" + gvk.Kind}
		m := o.meta()
		if m == nil || m.GetName() == "" {
			problems = append(problems, fmt.Sprintf("document %d: %s without metadata.name", doc, o.GVK))
			continue
		}
		id := gvk.Kind + "/" + m.GetNamespace() + "/" + m.GetName()
		if prev, dup := seen[id]; dup {
			problems = append(problems, fmt.Sprintf("%s: the same kind and name as document %d", o, prev))
		}
		seen[id] = doc
		objs = append(objs, o)
	}
	if len(objs) == 0 && len(problems) == 0 {
		problems = append(problems, "no objects")
	}
	return objs, problems
}

func summary(objs []Object) string {
	count := map[string]int{}
	for _, o := range objs {
		count[o.GVK[strings.LastIndex(o.GVK, "/")+1:]]++
	}
	var parts []string
	for k, n := range count {
		parts = append(parts, fmt.Sprintf("%d %s", n, k))
	}
	sort.Strings(parts)
	return strings.Join(parts, ", ")
}

// podOwner is an object with a pod template: a StatefulSet, a Job or a CronJob.
type podOwner struct {
	Object
	Spec   *corev1.PodSpec
	Labels map[string]string
	Annots map[string]string
}

func podOwners(objs []Object) []podOwner {
	var out []podOwner
	for _, o := range objs {
		switch v := o.Obj.(type) {
		case *appsv1.StatefulSet:
			out = append(out, podOwner{o, &v.Spec.Template.Spec, v.Spec.Template.Labels, v.Spec.Template.Annotations})
		case *appsv1.Deployment:
			out = append(out, podOwner{o, &v.Spec.Template.Spec, v.Spec.Template.Labels, v.Spec.Template.Annotations})
		case *batchv1.Job:
			out = append(out, podOwner{o, &v.Spec.Template.Spec, v.Spec.Template.Labels, v.Spec.Template.Annotations})
		case *batchv1.CronJob:
			t := &v.Spec.JobTemplate.Spec.Template
			out = append(out, podOwner{o, &t.Spec, t.Labels, t.Annotations})
		}
	}
	return out
}

// Check applies the chart's own rules to decoded objects.
func Check(objs []Object, keys map[string]bool) []string {
	var p []string
	add := func(o fmt.Stringer, format string, args ...any) {
		p = append(p, o.String()+": "+fmt.Sprintf(format, args...))
	}
	services := map[string]*corev1.Service{}
	secrets := map[string]Object{}
	var pdbs []*policyv1.PodDisruptionBudget
	for _, o := range objs {
		switch v := o.Obj.(type) {
		case *corev1.Service:
			services[v.Name] = v
		case *corev1.Secret:
			secrets[v.Name] = o
		case *policyv1.PodDisruptionBudget:
			pdbs = append(pdbs, v)
		}
	}
	owners := podOwners(objs)
	if len(owners) == 0 {
		p = append(p, "no StatefulSet, Job or CronJob")
	}
	for _, w := range owners {
		p = append(p, checkPod(w, keys)...)
	}
	statefulSets := 0
	for _, o := range objs {
		switch v := o.Obj.(type) {
		case *appsv1.StatefulSet:
			statefulSets++
			p = append(p, checkStatefulSet(o, v, services, pdbs)...)
		case *batchv1.Job:
			if runs(v.Spec.Template.Spec, "edgelog", "setup") {
				p = append(p, checkSetupHook(o, v, secrets)...)
			}
		case *policyv1.PodDisruptionBudget:
			if v.Spec.MaxUnavailable == nil && v.Spec.MinAvailable == nil {
				add(o, "neither maxUnavailable nor minAvailable")
			}
		case *monitoringv1.ServiceMonitor:
			p = append(p, checkServiceMonitor(o, v, services)...)
		}
	}
	if statefulSets == 0 {
		p = append(p, "no StatefulSet")
	}
	return p
}

func runs(spec corev1.PodSpec, command ...string) bool {
	for _, c := range spec.Containers {
		if strings.Join(append(append([]string{}, c.Command...), c.Args...), " ") == strings.Join(command, " ") {
			return true
		}
	}
	return false
}

func checkPod(w podOwner, keys map[string]bool) []string {
	var p []string
	add := func(format string, args ...any) { p = append(p, w.String()+": "+fmt.Sprintf(format, args...)) }
	s := w.Spec
	if s.EnableServiceLinks == nil || *s.EnableServiceLinks {
		add("enableServiceLinks is not false: a Service named edgelog-… would add EDGELOG_…_PORT variables, which stop the binaries")
	}
	podNonRoot := s.SecurityContext != nil && s.SecurityContext.RunAsNonRoot != nil && *s.SecurityContext.RunAsNonRoot
	if len(s.Containers) == 0 {
		add("no containers")
	}
	volumes := map[string]bool{}
	for _, v := range s.Volumes {
		volumes[v.Name] = true
	}
	for _, c := range s.Containers {
		cadd := func(format string, args ...any) { add("container %s: %s", c.Name, fmt.Sprintf(format, args...)) }
		sc := c.SecurityContext
		switch {
		case sc == nil:
			cadd("no securityContext")
		default:
			if !podNonRoot && (sc.RunAsNonRoot == nil || !*sc.RunAsNonRoot) {
				cadd("runAsNonRoot is not set (pod or container)")
			}
			if sc.ReadOnlyRootFilesystem == nil || !*sc.ReadOnlyRootFilesystem {
				cadd("readOnlyRootFilesystem is not true")
			}
			if sc.AllowPrivilegeEscalation == nil || *sc.AllowPrivilegeEscalation {
				cadd("allowPrivilegeEscalation is not false")
			}
			if sc.Capabilities == nil || !containsCap(sc.Capabilities.Drop, "ALL") {
				cadd("capabilities do not drop ALL")
			}
		}
		if c.Resources.Requests.Cpu().IsZero() || c.Resources.Requests.Memory().IsZero() {
			cadd("no cpu and memory requests")
		}
		if c.Resources.Limits.Memory().IsZero() {
			cadd("no memory limit")
		}
		for _, m := range c.VolumeMounts {
			if !volumes[m.Name] {
				cadd("mounts volume %q, which the pod does not have", m.Name)
			}
		}
		names := map[string]bool{}
		for _, e := range c.Env {
			if names[e.Name] {
				cadd("env %s twice (the last one wins, silently)", e.Name)
			}
			names[e.Name] = true
			if strings.HasPrefix(e.Name, "EDGELOG_") {
				if why := configKeyProblem(e.Name, keys); why != "" {
					cadd("env %s: %s", e.Name, why)
				}
			}
			if isSecretName(e.Name) && (e.ValueFrom == nil || e.ValueFrom.SecretKeyRef == nil) {
				cadd("env %s is a secret but not taken from a Secret", e.Name)
			}
		}
		if port := w.Annots["prometheus.io/port"]; w.Annots["prometheus.io/scrape"] == "true" && containerPort(s, port) == nil {
			cadd("prometheus.io/port %q is not a container port", port)
		}
	}
	return p
}

func containsCap(caps []corev1.Capability, want corev1.Capability) bool {
	for _, c := range caps {
		if c == want {
			return true
		}
	}
	return false
}

func isSecretName(env string) bool {
	n := strings.ToLower(env)
	return strings.Contains(n, "password") || strings.Contains(n, "secret")
}

func containerPort(s *corev1.PodSpec, port string) *corev1.ContainerPort {
	for _, c := range s.Containers {
		for i, cp := range c.Ports {
			if cp.Name == port || strconv.Itoa(int(cp.ContainerPort)) == port {
				return &c.Ports[i]
			}
		}
	}
	return nil
}

// configKeyProblem says why an EDGELOG_* name is not a configuration key ("" when it is).
// The settings loader lower-cases the name and splits it at "__" (shared/config.rs).
func configKeyProblem(env string, keys map[string]bool) string {
	parts := strings.Split(strings.ToLower(strings.TrimPrefix(env, "EDGELOG_")), "__")
	known := false
	for _, s := range sections {
		known = known || parts[0] == s
	}
	if !known {
		return fmt.Sprintf("%q is not a configuration section (%s)", parts[0], strings.Join(sections, ", "))
	}
	if len(parts) < 2 {
		return "names a whole section, not a key"
	}
	key := parts[0] + "." + parts[1]
	for _, m := range mapKeys {
		if key == m {
			if len(parts) != 3 || parts[2] == "" {
				return "a librdkafka option needs exactly one name after " + m
			}
			return ""
		}
	}
	if len(parts) > 2 {
		return fmt.Sprintf("%s is not a table", key)
	}
	if keys != nil && !keys[key] {
		return fmt.Sprintf("%s is not a key `edgelog config` knows", key)
	}
	return ""
}

func checkStatefulSet(o Object, v *appsv1.StatefulSet, services map[string]*corev1.Service, pdbs []*policyv1.PodDisruptionBudget) []string {
	var p []string
	add := func(format string, args ...any) { p = append(p, o.String()+": "+fmt.Sprintf(format, args...)) }
	podLabels := labels.Set(v.Spec.Template.Labels)
	sel, err := metav1.LabelSelectorAsSelector(v.Spec.Selector)
	if err != nil || v.Spec.Selector == nil || sel.Empty() || !sel.Matches(podLabels) {
		add("selector does not match the pod template's labels")
	}
	if svc, ok := services[v.Spec.ServiceName]; !ok {
		add("serviceName %q: no such Service rendered", v.Spec.ServiceName)
	} else {
		if svc.Spec.ClusterIP != corev1.ClusterIPNone {
			add("Service %s is not headless", svc.Name)
		}
		if len(svc.Spec.Selector) == 0 || !labels.SelectorFromSet(svc.Spec.Selector).Matches(podLabels) {
			add("Service %s does not select the pods", svc.Name)
		}
	}
	covering := 0
	for _, pdb := range pdbs {
		s, err := metav1.LabelSelectorAsSelector(pdb.Spec.Selector)
		if err == nil && !s.Empty() && s.Matches(podLabels) {
			covering++
		}
	}
	if covering != 1 {
		add("covered by %d PodDisruptionBudgets, want 1", covering)
	}
	if v.Spec.Template.Spec.TerminationGracePeriodSeconds == nil {
		add("no terminationGracePeriodSeconds")
	}
	for _, c := range v.Spec.Template.Spec.Containers {
		cadd := func(format string, args ...any) { add("container %s: %s", c.Name, fmt.Sprintf(format, args...)) }
		listen := ""
		for _, e := range c.Env {
			if strings.HasSuffix(e.Name, "__METRICS_LISTEN") {
				listen = e.Value
			}
		}
		for _, pr := range []struct {
			what  string
			probe *corev1.Probe
			path  string
		}{{"livenessProbe", c.LivenessProbe, "/healthz"}, {"readinessProbe", c.ReadinessProbe, "/readyz"}} {
			if pr.probe == nil || pr.probe.HTTPGet == nil {
				cadd("no HTTP %s", pr.what)
				continue
			}
			if pr.probe.HTTPGet.Path != pr.path {
				cadd("%s on %s, want %s", pr.what, pr.probe.HTTPGet.Path, pr.path)
			}
			cp := containerPort(&v.Spec.Template.Spec, pr.probe.HTTPGet.Port.String())
			if cp == nil {
				cadd("%s port %s is not a container port", pr.what, pr.probe.HTTPGet.Port.String())
			} else if want := fmt.Sprintf("0.0.0.0:%d", cp.ContainerPort); listen != want {
				cadd("%s on port %d but the stage listens on %q (want %s)", pr.what, cp.ContainerPort, listen, want)
			}
		}
		if runs(v.Spec.Template.Spec, "anonymizer") {
			found := false
			for _, e := range c.Env {
				if e.Name == "EDGELOG_ANONYMIZER__INSTANCE_ID" {
					found = e.ValueFrom != nil && e.ValueFrom.FieldRef != nil
				}
			}
			if !found {
				cadd("EDGELOG_ANONYMIZER__INSTANCE_ID is not taken from the pod (each replica needs its own)")
			}
		}
	}
	return p
}

func hookWeight(m metav1.Object) int {
	w, _ := strconv.Atoi(m.GetAnnotations()["helm.sh/hook-weight"])
	return w
}

func checkSetupHook(o Object, v *batchv1.Job, secrets map[string]Object) []string {
	var p []string
	hooks := strings.Split(v.Annotations["helm.sh/hook"], ",")
	has := func(h string) bool {
		for _, x := range hooks {
			if strings.TrimSpace(x) == h {
				return true
			}
		}
		return false
	}
	if !has("pre-install") || !has("pre-upgrade") {
		p = append(p, fmt.Sprintf("%s: runs `edgelog setup` but helm.sh/hook is %q, want pre-install and pre-upgrade", o, v.Annotations["helm.sh/hook"]))
		return p
	}
	if v.Spec.Template.Spec.RestartPolicy != corev1.RestartPolicyNever && v.Spec.Template.Spec.RestartPolicy != corev1.RestartPolicyOnFailure {
		p = append(p, fmt.Sprintf("%s: restartPolicy %q", o, v.Spec.Template.Spec.RestartPolicy))
	}
	// A Secret the hook reads must exist before it: rendered as an earlier hook.
	for _, c := range v.Spec.Template.Spec.Containers {
		for _, e := range c.Env {
			if e.ValueFrom == nil || e.ValueFrom.SecretKeyRef == nil {
				continue
			}
			s, ok := secrets[e.ValueFrom.SecretKeyRef.Name]
			if !ok {
				continue // an existing Secret, not the chart's
			}
			if s.meta().GetAnnotations()["helm.sh/hook"] == "" || hookWeight(s.meta()) >= hookWeight(v) {
				p = append(p, fmt.Sprintf("%s: reads Secret %s, which is not a hook created before it", o, s.meta().GetName()))
			}
		}
	}
	return p
}

func checkServiceMonitor(o Object, v *monitoringv1.ServiceMonitor, services map[string]*corev1.Service) []string {
	var p []string
	sel, err := metav1.LabelSelectorAsSelector(&v.Spec.Selector)
	if err != nil {
		return []string{fmt.Sprintf("%s: selector: %v", o, err)}
	}
	matched := 0
	for _, svc := range services {
		if !sel.Matches(labels.Set(svc.Labels)) {
			continue
		}
		matched++
		for _, ep := range v.Spec.Endpoints {
			found := false
			for _, sp := range svc.Spec.Ports {
				found = found || sp.Name == ep.Port
			}
			if !found {
				p = append(p, fmt.Sprintf("%s: endpoint port %q is not a port of Service %s", o, ep.Port, svc.Name))
			}
		}
	}
	if matched == 0 {
		p = append(p, fmt.Sprintf("%s: selects no rendered Service", o))
	}
	return p
}

// writeEnvFiles writes one NAME=value file per container whose environment holds EDGELOG_*
// variables; values from Secrets and the downward API become placeholders of the right shape.
func writeEnvFiles(objs []Object, prefix string) error {
	for _, w := range podOwners(objs) {
		for _, c := range w.Spec.Containers {
			var lines []string
			for _, e := range c.Env {
				if !strings.HasPrefix(e.Name, "EDGELOG_") {
					continue
				}
				value := e.Value
				if e.ValueFrom != nil {
					switch {
					case e.ValueFrom.SecretKeyRef != nil:
						value = placeholderSecret
					case e.ValueFrom.FieldRef != nil && strings.Contains(e.ValueFrom.FieldRef.FieldPath, "pod-index"):
						value = "0"
					case e.ValueFrom.FieldRef != nil:
						value = w.meta().GetName() + "-0"
					default:
						return fmt.Errorf("%s: env %s: no placeholder for this valueFrom", w, e.Name)
					}
				}
				lines = append(lines, e.Name+"="+value)
			}
			if len(lines) == 0 {
				continue
			}
			name := fmt.Sprintf("%s-%s-%s-%s.env", prefix, strings.ToLower(w.GVK[strings.LastIndex(w.GVK, "/")+1:]), w.meta().GetName(), c.Name)
			if err := os.WriteFile(name, []byte(strings.Join(lines, "\n")+"\n"), 0o600); err != nil {
				return err
			}
		}
	}
	return nil
}
