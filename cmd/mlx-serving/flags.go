package main

import (
	"flag"
	"fmt"
	"os"
	"reflect"
	"strconv"
	"strings"
	"time"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	"github.com/mlx-serving/mlx-serving/config"
)

// Flag groups, shown apart in a command's help (usageTemplate).
const (
	groupAnnotation = "mlx-serving/group"
	groupConnection = "connection"
	groupSettings   = "settings"
)

// connectionKeys are the settings a client command uses: where NATS is and how
// to authenticate to it.
var connectionKeys = []string{"nats_url", "nats_user", "nats_password", "nats_creds", "nats_ca", "nats_cert", "nats_key"}

// allKeys is every setting (the server commands' flags).
func allKeys() []string {
	out := make([]string, len(config.Keys))
	for i, k := range config.Keys {
		out[i] = k.Name
	}
	return out
}

// usageOverrides are help texts clearer on the command line than the config
// table's.
var usageOverrides = map[string]string{
	"log_level": "log level: trace, debug, info, warn or error",
}

// enumValues complete the settings with a fixed set of values.
var enumValues = map[string][]string{
	"log_level":   {"trace", "debug", "info", "warn", "error"},
	"log_format":  {"json", "console"},
	"sync_always": {"true", "false"},
	"routing":     {"prefix", "least_loaded"},
}

// fileKeys and dirKeys complete as paths.
var (
	fileKeys = map[string]bool{"nats_creds": true, "nats_ca": true, "nats_cert": true, "nats_key": true, "python": true}
	dirKeys  = map[string]bool{"data_dir": true}
)

// settings is a command's flags for configuration keys. Each flag is typed like
// its key (int, bool, duration or string); config.Load still owns precedence —
// flag > env > file > default — because only flags set on the command line are
// handed to it, as strings it parses itself.
type settings struct {
	fs   *pflag.FlagSet
	keys []config.Key
}

// bindSettings adds --config and a flag for each named key to fs, in group.
func bindSettings(fs *pflag.FlagSet, group string, names ...string) *settings {
	s := &settings{fs: fs}
	byName := map[string]config.Key{}
	for _, k := range config.Keys {
		byName[k.Name] = k
	}
	kinds := configKinds()
	for _, name := range names {
		k, ok := byName[name]
		if !ok {
			panic("mlx-serving: no config key " + name)
		}
		s.keys = append(s.keys, k)
		usage := k.Usage
		if u, ok := usageOverrides[k.Name]; ok {
			usage = u
		}
		usage += " (env " + k.Env + ")"
		switch kinds[k.Name] {
		case reflect.Int, reflect.Int64:
			var n int64
			if _, err := fmt.Sscan(k.Default, &n); err != nil {
				panic("mlx-serving: default of " + k.Name + ": " + err.Error())
			}
			if kinds[k.Name] == reflect.Int {
				fs.Int(k.Flag, int(n), usage)
			} else {
				fs.Int64(k.Flag, n, usage)
			}
		case reflect.Bool:
			fs.Bool(k.Flag, k.Default == "true", usage)
		case reflect.Float64:
			f, err := strconv.ParseFloat(k.Default, 64)
			if err != nil {
				panic("mlx-serving: default of " + k.Name + ": " + err.Error())
			}
			fs.Float64(k.Flag, f, usage)
		default:
			if d, err := time.ParseDuration(k.Default); err == nil && k.Default != "0" {
				fs.Duration(k.Flag, d, usage)
			} else {
				fs.String(k.Flag, k.Default, usage)
			}
		}
		setGroup(fs.Lookup(k.Flag), group)
	}
	fs.String("config", "", "YAML config file (env MLX_SERVING_CONFIG)")
	setGroup(fs.Lookup("config"), group)
	return s
}

// complete registers shell completion for the settings' values on cmd.
func (s *settings) complete(cmd *cobra.Command) {
	_ = cmd.MarkFlagFilename("config", "yaml", "yml")
	for _, k := range s.keys {
		switch {
		case enumValues[k.Name] != nil:
			vals := enumValues[k.Name]
			_ = cmd.RegisterFlagCompletionFunc(k.Flag, cobra.FixedCompletions(vals, cobra.ShellCompDirectiveNoFileComp))
		case fileKeys[k.Name]:
			_ = cmd.MarkFlagFilename(k.Flag)
		case dirKeys[k.Name]:
			_ = cmd.MarkFlagDirname(k.Flag)
		}
	}
}

func setGroup(f *pflag.Flag, group string) {
	if f.Annotations == nil {
		f.Annotations = map[string][]string{}
	}
	f.Annotations[groupAnnotation] = []string{group}
}

// configKinds maps each key to the kind of its Config field.
func configKinds() map[string]reflect.Kind {
	out := map[string]reflect.Kind{}
	t := reflect.TypeOf(config.Config{})
	for i := range t.NumField() {
		name, _, _ := strings.Cut(t.Field(i).Tag.Get("json"), ",")
		out[name] = t.Field(i).Type.Kind()
	}
	return out
}

// load is the effective configuration: the flags set on the command line go to
// config.Load as the standard flag set it reads.
func (s *settings) load() (config.Config, error) {
	gofs := flag.NewFlagSet("settings", flag.ContinueOnError)
	config.RegisterFlags(gofs)
	var err error
	s.fs.Visit(func(f *pflag.Flag) {
		if gofs.Lookup(f.Name) == nil || err != nil {
			return
		}
		v := f.Value.String()
		if f.Value.Type() == "duration" {
			d, _ := s.fs.GetDuration(f.Name)
			v = schemaDuration(d)
		}
		err = gofs.Set(f.Name, v)
	})
	if err != nil {
		return config.Config{}, err
	}
	return config.Load(gofs, os.Environ())
}

// schemaDuration writes d as the schema's durations are: one integer and
// one unit (90s, not 1m30s).
func schemaDuration(d time.Duration) string {
	if d == 0 {
		return "0s"
	}
	for _, u := range []struct {
		d    time.Duration
		name string
	}{{time.Minute, "m"}, {time.Second, "s"}, {time.Millisecond, "ms"}, {time.Microsecond, "us"}} {
		if d%u.d == 0 {
			return fmt.Sprintf("%d%s", d/u.d, u.name)
		}
	}
	return fmt.Sprintf("%dns", d)
}

// changed reports whether the setting named by flag was given as a flag or in
// its environment variable.
func (s *settings) changed(flagName, env string) bool {
	return s.fs.Changed(flagName) || os.Getenv(env) != ""
}

// flagGroup is the help text of cmd's local flags in group ("" for the
// command's own flags).
func flagGroup(cmd *cobra.Command, group string) string {
	fs := pflag.NewFlagSet(cmd.Name(), pflag.ContinueOnError)
	cmd.LocalFlags().VisitAll(func(f *pflag.Flag) {
		if f.Hidden {
			return
		}
		g := ""
		if a := f.Annotations[groupAnnotation]; len(a) > 0 {
			g = a[0]
		}
		if g == group {
			fs.AddFlag(f)
		}
	})
	return strings.TrimRight(fs.FlagUsages(), " \n")
}
