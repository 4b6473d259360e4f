package results

// ResultRefused is resultRefused for the external tests (results_test), which
// run on testenv's bus: testenv imports this package, so they cannot be
// internal.
var ResultRefused = resultRefused
