package dispatcher

import (
	"testing"

	"github.com/mlx-serving/mlx-serving/schemas"
)

// TestDefaultWeightsCoverPriorities: a priority added to schemas.Priorities
// without a default weight here makes every dispatcher refuse to start.
func TestDefaultWeightsCoverPriorities(t *testing.T) {
	t.Parallel()
	for i, w := range DefaultWeights {
		if w <= 0 {
			t.Errorf("DefaultWeights[%d] (%s) = %d, want > 0", i, schemas.Priorities[i], w)
		}
	}
	for _, p := range append(schemas.Priorities, "", "bogus") {
		if i := priorityIndex(p); i < 0 || i >= schemas.NumPriorities {
			t.Errorf("priorityIndex(%q) = %d", p, i)
		}
	}
	if priorityIndex("") != priorityIndex(schemas.PriorityNormal) {
		t.Error("an absent priority is not normal")
	}
}
