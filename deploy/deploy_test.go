// Package deploy_test checks the deploy files as far as this machine can
// without a container runtime or a cluster: every Kubernetes manifest and
// the compose stack parse and hang together, their Tidemark configs pass
// Tidemark's validation, the Dockerfile's build step builds a static
// binary that reports the stamped version, and the systemd unit verifies.
package deploy_test

import (
	"bytes"
	"errors"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"gopkg.in/yaml.v3"

	"github.com/tidemark/tidemark/internal/config"
)

type probe struct {
	HTTPGet struct {
		Path string `yaml:"path"`
		Port any    `yaml:"port"`
	} `yaml:"httpGet"`
}

type container struct {
	Name    string   `yaml:"name"`
	Image   string   `yaml:"image"`
	Args    []string `yaml:"args"`
	EnvFrom []struct {
		SecretRef struct{ Name string } `yaml:"secretRef"`
	} `yaml:"envFrom"`
	Env []struct {
		Name, Value string
	} `yaml:"env"`
	Ports []struct {
		Name          string `yaml:"name"`
		ContainerPort int    `yaml:"containerPort"`
	} `yaml:"ports"`
	Readiness *probe `yaml:"readinessProbe"`
	Liveness  *probe `yaml:"livenessProbe"`
}

type manifest struct {
	APIVersion string `yaml:"apiVersion"`
	Kind       string `yaml:"kind"`
	Metadata   struct {
		Name   string            `yaml:"name"`
		Labels map[string]string `yaml:"labels"`
	} `yaml:"metadata"`
	Data       map[string]string `yaml:"data"`
	StringData map[string]string `yaml:"stringData"`
	Spec       struct {
		Replicas *int `yaml:"replicas"`
		Selector struct {
			MatchLabels map[string]string `yaml:"matchLabels"`
		} `yaml:"selector"`
		Template struct {
			Metadata struct {
				Labels map[string]string `yaml:"labels"`
			} `yaml:"metadata"`
			Spec struct {
				Containers []container `yaml:"containers"`
			} `yaml:"spec"`
		} `yaml:"template"`
		MinAvailable *int `yaml:"minAvailable"`
	} `yaml:"spec"`
}

func TestKubernetesManifests(t *testing.T) {
	f, err := os.Open("kubernetes/tidemark.yaml")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	dec := yaml.NewDecoder(f)
	var ms []manifest
	for {
		var m manifest
		if err := dec.Decode(&m); errors.Is(err, io.EOF) {
			break
		} else if err != nil {
			t.Fatalf("kubernetes/tidemark.yaml: %v", err)
		}
		ms = append(ms, m)
	}
	kinds := map[string]int{}
	var secretKeys map[string]string
	var cfgText string
	for _, m := range ms {
		kinds[m.Kind]++
		if m.APIVersion == "" || m.Kind == "" || m.Metadata.Name == "" {
			t.Errorf("a manifest lacks apiVersion, kind or name: %+v", m)
		}
		switch m.Kind {
		case "Secret":
			secretKeys = m.StringData
		case "ConfigMap":
			cfgText = m.Data["tidemark.yml"]
		case "Deployment", "PodDisruptionBudget", "Service":
			sel := m.Spec.Selector.MatchLabels
			if m.Kind == "Service" {
				continue
			}
			if len(sel) == 0 {
				t.Errorf("%s %s has no selector", m.Kind, m.Metadata.Name)
			}
			if m.Kind != "Deployment" {
				continue
			}
			for k, v := range sel {
				if m.Spec.Template.Metadata.Labels[k] != v {
					t.Errorf("Deployment %s: selector %s=%s does not match its pod labels", m.Metadata.Name, k, v)
				}
			}
			for _, c := range m.Spec.Template.Spec.Containers {
				if c.Readiness == nil || c.Readiness.HTTPGet.Path != "/readyz" || c.Liveness == nil || c.Liveness.HTTPGet.Path != "/healthz" {
					t.Errorf("%s/%s: want a /readyz readiness and a /healthz liveness probe", m.Metadata.Name, c.Name)
				}
				if len(c.EnvFrom) == 0 || c.EnvFrom[0].SecretRef.Name != "tidemark" {
					t.Errorf("%s/%s does not take the secrets from the Secret", m.Metadata.Name, c.Name)
				}
				if len(c.Args) < 2 || c.Args[0] != "run" {
					t.Errorf("%s/%s args %v", m.Metadata.Name, c.Name, c.Args)
				}
			}
		}
	}
	if kinds["Deployment"] < 1 || kinds["ConfigMap"] != 1 || kinds["Secret"] != 1 || kinds["Service"] < 1 || kinds["PodDisruptionBudget"] != 1 {
		t.Errorf("manifest kinds %v", kinds)
	}
	for _, m := range ms {
		if m.Kind == "Deployment" && m.Metadata.Name == "tidemark-capture" && (m.Spec.Replicas == nil || *m.Spec.Replicas != 2) {
			t.Errorf("the capture Deployment should run 2 replicas (leader and standby)")
		}
	}
	// The ConfigMap's config passes Tidemark's validation with the
	// Secret's values as the environment.
	if _, err := config.Parse("ConfigMap tidemark/tidemark.yml", []byte(cfgText), func(k string) string { return secretKeys[k] }); err != nil {
		t.Errorf("the ConfigMap's config: %v", err)
	}
	if strings.Contains(cfgText, "password") && !strings.Contains(cfgText, "password_hash") {
		t.Errorf("a password in the ConfigMap; it belongs in the Secret")
	}
}

func TestComposeStack(t *testing.T) {
	var compose struct {
		Services map[string]struct {
			Image   string            `yaml:"image"`
			Build   map[string]string `yaml:"build"`
			Volumes []string          `yaml:"volumes"`
		} `yaml:"services"`
	}
	b, err := os.ReadFile("compose/compose.yml")
	if err != nil {
		t.Fatal(err)
	}
	if err := yaml.Unmarshal(b, &compose); err != nil {
		t.Fatalf("compose/compose.yml: %v", err)
	}
	for _, s := range []string{"postgres", "kafka", "redis", "tidemark", "prometheus"} {
		if _, ok := compose.Services[s]; !ok {
			t.Errorf("compose.yml has no %s service", s)
		}
	}
	for name, s := range compose.Services {
		for _, v := range s.Volumes {
			host := strings.Split(v, ":")[0]
			if _, err := os.Stat(filepath.Join("compose", host)); err != nil {
				t.Errorf("service %s mounts %s, which does not exist: %v", name, host, err)
			}
		}
	}
	if dockerfile := filepath.Join("compose", compose.Services["tidemark"].Build["context"], compose.Services["tidemark"].Build["dockerfile"]); !fileExists(dockerfile) {
		t.Errorf("the tidemark service builds %s, which does not exist", dockerfile)
	}
	b, err = os.ReadFile("compose/tidemark.yml")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := config.Parse("compose/tidemark.yml", b, func(k string) string {
		return map[string]string{"TIDEMARK_POSTGRES_PASSWORD": "chat"}[k]
	}); err != nil {
		t.Errorf("compose/tidemark.yml: %v", err)
	}
}

func fileExists(p string) bool { _, err := os.Stat(p); return err == nil }

// TestDockerfileBuild runs the Dockerfile's build step as it is written
// there (a static, stripped binary stamped with VERSION) and checks what
// it built.
func TestDockerfileBuild(t *testing.T) {
	if testing.Short() {
		t.Skip("builds the binary")
	}
	b, err := os.ReadFile("../Dockerfile")
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"CGO_ENABLED=0", "-trimpath", "internal/buildinfo.version=${VERSION}", "distroless/static", "USER nonroot", "./cmd/tidemark"} {
		if !bytes.Contains(b, []byte(want)) {
			t.Errorf("Dockerfile lacks %q", want)
		}
	}
	out := filepath.Join(t.TempDir(), "tidemark")
	cmd := exec.Command("go", "build", "-trimpath", "-ldflags", "-s -w -X github.com/tidemark/tidemark/internal/buildinfo.version=9.9.9-test", "-o", out, "./cmd/tidemark")
	cmd.Dir = ".."
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("the Dockerfile's build: %v\n%s", err, b)
	}
	v, err := exec.Command(out, "version").Output()
	if err != nil || !strings.HasPrefix(string(v), "tidemark 9.9.9-test\n") {
		t.Errorf("tidemark version: %q, %v", v, err)
	}
	if f, err := exec.Command("file", out).Output(); err == nil && !bytes.Contains(f, []byte("statically linked")) {
		t.Errorf("not a static binary: %s", f)
	}
}

// TestSystemdUnit: the unit verifies and does not restart on a bad config
// (exit 2) or a preflight problem (exit 3).
func TestSystemdUnit(t *testing.T) {
	b, err := os.ReadFile("systemd/tidemark.service")
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Contains(b, []byte("\nRestartPreventExitStatus=2 3\n")) {
		t.Error("the unit restarts on exit 2 and 3 (bad config, preflight problem): add RestartPreventExitStatus=2 3")
	}
	sa, err := exec.LookPath("systemd-analyze")
	if err != nil {
		t.Skip("systemd-analyze not installed")
	}
	out, err := exec.Command(sa, "verify", "--man=no", "systemd/tidemark.service").CombinedOutput()
	// The binary path is not installed here; anything else is a problem.
	for _, l := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		if l != "" && !strings.Contains(l, "/usr/local/bin/tidemark") {
			t.Errorf("systemd-analyze verify: %s (%v)", l, err)
		}
	}
}
