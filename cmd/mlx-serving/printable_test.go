package main

import "testing"

// A worker's heartbeat may carry escape sequences in its model names (the
// schemas allow control characters there); status must not pass them to the
// operator's terminal. Mutation caught: printable returning s unchanged.
func TestPrintableStripsControlCharacters(t *testing.T) {
	t.Parallel()
	in := "tiny\x1b]0;PWNED-TITLE\x07\x1b[31mRED\x1b[0m\u009b"
	if got, want := printable(in), "tiny?]0;PWNED-TITLE??[31mRED?[0m?"; got != want {
		t.Fatalf("printable(%q) = %q, want %q", in, got, want)
	}
	if got := printable("llama-3.2-1b,qwen·2"); got != "llama-3.2-1b,qwen·2" {
		t.Fatalf("a plain name changed: %q", got)
	}
}
