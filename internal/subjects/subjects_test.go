package subjects

import "testing"

func TestModelKeyIsAValidKVKey(t *testing.T) {
	for _, m := range []string{"tiny", "mlx-community/Qwen2.5-0.5B-Instruct-4bit", "/Users/me/models/x y", "a:b@c", ""} {
		k := ModelKey(m)
		if len(k) != 33 || k[0] != 'm' {
			t.Fatalf("ModelKey(%q) = %q", m, k)
		}
	}
	if ModelKey("a") == ModelKey("b") {
		t.Fatal("distinct models share a key")
	}
}
