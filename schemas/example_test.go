package schemas_test

import (
	"errors"
	"fmt"

	"github.com/mlx-serving/mlx-serving/schemas"
)

func ExampleValidate() {
	job := []byte(`{
		"id": "01JZ8Q4T6W3N5V7X9Y1A2B3C4D",
		"messages": [
			{"role": "system", "content": "Be brief."},
			{"role": "robot", "content": "Hello"}
		],
		"temperature": 5,
		"reply_to": "_INBOX.producer1.01JZ8Q4T6W3N5V7X9Y1A2B3C4D"
	}`)

	err := schemas.Validate(schemas.Job, job)
	fmt.Println("invalid:", errors.Is(err, schemas.ErrInvalid))

	var verr *schemas.ValidationError
	if errors.As(err, &verr) {
		fmt.Println("code:", verr.Code)
		for _, v := range verr.Violations {
			fmt.Printf("%s: %s\n", v.Path, v.Reason)
		}
	}
	// Output:
	// invalid: true
	// code: invalid_request
	// $.messages[1].role: messages.1.role must be one of the following: "system", "user", "assistant", "tool"
	// $.model: model is required
	// $.temperature: Must be less than or equal to 2
}
