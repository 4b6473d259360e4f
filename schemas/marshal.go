package schemas

import (
	"encoding/json"
	"fmt"
	"math"
	"reflect"
	"strconv"
	"strings"
	"time"
)

// Marshal encodes v, a message of type t, as JSON. A value JSON cannot carry
// (a NaN or infinite float, a time before year 0 or after 9999) is a
// ValidationError at its path, like any other bad field: encoding/json's
// "unsupported value: NaN" named neither the field nor a stable code, and a
// caller checking errors.Is(err, ErrInvalid) took it for a bus failure (red
// team round 22, the bus client's lows).
func Marshal(t Type, v any) ([]byte, error) {
	data, err := json.Marshal(v)
	if err == nil {
		return data, nil
	}
	if path, reason := unencodable(reflect.ValueOf(v), "$"); path != "" {
		return nil, &ValidationError{Code: Code(t), Type: t, Violations: []Violation{{Path: path, Reason: reason}}}
	}
	return nil, fmt.Errorf("schemas: encode %s: %w", t, err)
}

var timeType = reflect.TypeFor[time.Time]()

// unencodable finds the first value under v (at path) that encoding/json
// refuses, following the json tags as encoding/json does (embedded structs
// flatten, "-" and unexported fields are skipped). It returns "" when none.
func unencodable(v reflect.Value, path string) (string, string) {
	for v.Kind() == reflect.Pointer || v.Kind() == reflect.Interface {
		if v.IsNil() {
			return "", ""
		}
		v = v.Elem()
	}
	switch {
	case v.Type() == timeType:
		if y := v.Interface().(time.Time).Year(); y < 0 || y > 9999 {
			return path, "must be a time in years 0 to 9999 (RFC 3339)"
		}
		return "", ""
	case v.Kind() == reflect.Float32 || v.Kind() == reflect.Float64:
		if f := v.Float(); math.IsNaN(f) || math.IsInf(f, 0) {
			return path, "must be a finite number, not " + strconv.FormatFloat(f, 'g', -1, 64)
		}
	case v.Kind() == reflect.Struct:
		return unencodableFields(v, path)
	case v.Kind() == reflect.Slice || v.Kind() == reflect.Array:
		for i := range v.Len() {
			if p, r := unencodable(v.Index(i), path+"["+strconv.Itoa(i)+"]"); p != "" {
				return p, r
			}
		}
	case v.Kind() == reflect.Map:
		iter := v.MapRange()
		for iter.Next() {
			if p, r := unencodable(iter.Value(), path+"."+fmt.Sprint(iter.Key().Interface())); p != "" {
				return p, r
			}
		}
	}
	return "", ""
}

func unencodableFields(v reflect.Value, path string) (string, string) {
	for i := range v.NumField() {
		f := v.Type().Field(i)
		name, opts, _ := strings.Cut(f.Tag.Get("json"), ",")
		if name == "-" && opts == "" || !f.IsExported() && !f.Anonymous {
			continue
		}
		fv := v.Field(i)
		if f.Anonymous && name == "" {
			if p, r := unencodable(fv, path); p != "" {
				return p, r
			}
			continue
		}
		if name == "" {
			name = f.Name
		}
		if p, r := unencodable(fv, path+"."+name); p != "" {
			return p, r
		}
	}
	return "", ""
}
