package gateway

import (
	"net/http"
	"strings"
	"testing"

	"github.com/mlx-serving/mlx-serving/internal/jsprov"
	"github.com/mlx-serving/mlx-serving/schemas"
)

// deepSchema is a JSON Schema nesting objects levels deep.
func deepSchema(levels int) string {
	return strings.Repeat(`{"type":"array","items":`, levels-1) + `{"type":"string"}` + strings.Repeat(`}`, levels-1)
}

// TestDeepSchemaIs400AndNothingIsQueued: a json_schema or a tool's parameters
// nested 3000 levels deep (red-team F3: such a schema crashed the runtime and
// every job co-running on it) is a 400 naming the field, over the real bus, and
// never reaches JOBS. A ready worker is registered and nobody serves: a request
// that got past validation would be queued and hang. Mutation caught: the depth
// check left out of schemas.Validate (the first job is queued and answered 504
// at its deadline; JOBS holds it).
func TestDeepSchemaIs400AndNothingIsQueued(t *testing.T) {
	t.Parallel()
	tb := startBus(t, jsprov.Options{})
	tb.registerWorker(t, "w1", schemas.WorkerReady, testModel)
	g, srv := newTestGateway(t, tb, nil)

	deep := deepSchema(3000)
	cases := []struct{ name, body, param string }{
		{"json_schema", `{"model":"tiny-model","messages":[{"role":"user","content":"x"}],"max_tokens":4,` +
			`"response_format":{"type":"json_schema","json_schema":{"name":"x","schema":` + deep + `}}}`,
			"response_format.json_schema.schema"},
		{"tool parameters", `{"model":"tiny-model","messages":[{"role":"user","content":"x"}],` +
			`"tools":[{"type":"function","function":{"name":"ok"}},{"type":"function","function":{"name":"f","parameters":{"type":"object","properties":{"a":` + deep + `}}}}]}`,
			"tools[1].function.parameters"},
		{"at the bound plus one", `{"model":"tiny-model","messages":[{"role":"user","content":"x"}],` +
			`"response_format":{"type":"json_schema","json_schema":{"name":"x","schema":` + deepSchema(schemas.MaxSchemaDepth+1) + `}}}`,
			"response_format.json_schema.schema"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			resp := postJSON(t, srv.URL+"/v1/chat/completions", c.body)
			e := expectError(t, resp, http.StatusBadRequest, c.param, "invalid_value")
			if !strings.Contains(e.Error.Message, "64 levels deep") {
				t.Fatalf("message %q does not say why", e.Error.Message)
			}
		})
	}
	if n := jobsStored(t, tb); n != 0 {
		t.Fatalf("JOBS holds %d messages after refused requests", n)
	}
	if got := value(observed(g).Submitted.WithLabelValues(endpointChat)); got != 0 {
		t.Fatalf("%v deep jobs were submitted", got)
	}
}

// TestWideSchemaIs400AndNothingIsQueued: a schema of more than
// schemas.MaxSchemaNodes values, shallow and without refs or patterns (red team
// round 11's F6: a 0.95 MB enum of {} took each runtime to 1.16 GB), is a 400
// naming the field at the gateway, and nothing is queued (a schema at the
// bound is accepted: TestSchemaNodesBoundary). Mutation caught: schemaViolations'
// node bound removed (checkBodyValues alone lets 10,001 values through).
func TestWideSchemaIs400AndNothingIsQueued(t *testing.T) {
	t.Parallel()
	tb := startBus(t, jsprov.Options{})
	tb.registerWorker(t, "w1", schemas.WorkerReady, testModel)
	g, srv := newTestGateway(t, tb, nil)
	enum := func(members int) string {
		return `{"enum":[` + strings.TrimSuffix(strings.Repeat("{},", members), ",") + `]}`
	}
	body := func(schema string) string {
		return `{"model":"tiny-model","messages":[{"role":"user","content":"x"}],"max_tokens":4,` +
			`"response_format":{"type":"json_schema","json_schema":{"name":"x","schema":` + schema + `}}}`
	}
	// The schema's object and array count one each.
	e := expectError(t, postJSON(t, srv.URL+"/v1/chat/completions", body(enum(schemas.MaxSchemaNodes-1))),
		http.StatusBadRequest, "response_format.json_schema.schema", "invalid_value")
	if !strings.Contains(e.Error.Message, "more than 10000 values") {
		t.Fatalf("message %q does not say why", e.Error.Message)
	}
	if n := jobsStored(t, tb); n != 0 {
		t.Fatalf("JOBS holds %d messages after a refused request", n)
	}
	if got := value(observed(g).Submitted.WithLabelValues(endpointChat)); got != 0 {
		t.Fatalf("%v wide jobs were submitted", got)
	}
}
