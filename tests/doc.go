// Package tests holds cross-component tests: the real bus, dispatcher, worker and
// Python runtime together, the CLI against a real `mlx-serving up`, and the fault
// campaign.
package tests
