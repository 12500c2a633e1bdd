// Command macaroon-check is the reference side of Scopegate's macaroon cross-check: it uses
// github.com/superfly/macaroon (Fly's own implementation) to
//
//	vectors KEY_HEX KID_HEX LOCATION   print JSON test vectors: tokens minted and attenuated here,
//	                                   which the Python suite must decode, verify and re-encode
//	                                   byte for byte (tests/data/macaroon_vectors.json)
//	verify KEY_HEX                     read FlyV1 tokens (one per line) on stdin and print, per
//	                                   line, the verified caveats as JSON or {"error": ...}
//
// It is built by scripts/install-test-tools when the Go module proxy serves the module.
package main

import (
	"bufio"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"os"
	"strings"

	"github.com/superfly/macaroon"
	"github.com/superfly/macaroon/flyio"
	"github.com/superfly/macaroon/resset"
)

type vector struct {
	Name    string          `json:"name"`
	Token   string          `json:"token"`   // fm2_ token minted with the key, caveats added
	Caveats json.RawMessage `json:"caveats"` // the caveats as the library's JSON
	Packed  string          `json:"packed"`  // hex of the caveat set's msgpack encoding
}

type attenuation struct {
	Name   string `json:"name"`
	Base   string `json:"base"`   // fm2_ token before
	Added  string `json:"added"`  // hex of the added caveat set's msgpack encoding
	Result string `json:"result"` // fm2_ token after Add + Encode
}

type vectors struct {
	Key         string        `json:"key"`
	KID         string        `json:"kid"`
	Location    string        `json:"location"`
	Tokens      []vector      `json:"tokens"`
	Attenuation []attenuation `json:"attenuation"`
}

func must[T any](v T, err error) T {
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	return v
}

func caveatSets() map[string][]macaroon.Caveat {
	return map[string][]macaroon.Caveat{
		"none":            {},
		"apps-one":        {&flyio.Apps{Apps: resset.ResourceSet[uint64, resset.Action]{123: resset.ActionRead}}},
		"apps-many":       {&flyio.Apps{Apps: resset.ResourceSet[uint64, resset.Action]{70000: resset.ActionAll, 5: resset.ActionRead | resset.ActionWrite, 4294967296: resset.ActionDelete}}},
		"validity":        {&macaroon.ValidityWindow{NotBefore: 1796688000, NotAfter: 1796688300}},
		"mutations":       {&flyio.Mutations{Mutations: []string{"setSecrets", "createRelease"}}},
		"organization":    {&flyio.Organization{ID: 9876543210, Mask: resset.ActionRead}},
		"if-present":      {&resset.IfPresent{Ifs: macaroon.NewCaveatSet(&flyio.Apps{Apps: resset.ResourceSet[uint64, resset.Action]{42: resset.ActionAll}}), Else: resset.ActionRead}},
		"apps-and-window": {&flyio.Apps{Apps: resset.ResourceSet[uint64, resset.Action]{7: resset.ActionAll}}, &macaroon.ValidityWindow{NotBefore: 0, NotAfter: 1796688300}},
	}
}

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: macaroon-check vectors KEY_HEX KID_HEX LOCATION | verify KEY_HEX")
		os.Exit(2)
	}
	switch os.Args[1] {
	case "vectors":
		key := macaroon.SigningKey(must(hex.DecodeString(os.Args[2])))
		kid := must(hex.DecodeString(os.Args[3]))
		out := vectors{Key: os.Args[2], KID: os.Args[3], Location: os.Args[4]}
		names := []string{"none", "apps-one", "apps-many", "validity", "mutations", "organization", "if-present", "apps-and-window"}
		sets := caveatSets()
		for _, name := range names {
			m := must(macaroon.New(kid, os.Args[4], key))
			if err := m.Add(sets[name]...); err != nil {
				must(0, err)
			}
			tok := must(m.Encode())
			cavs := macaroon.NewCaveatSet(sets[name]...)
			out.Tokens = append(out.Tokens, vector{Name: name, Token: macaroon.ToAuthorizationHeader(tok)[len("FlyV1 "):],
				Caveats: must(json.Marshal(cavs)), Packed: hex.EncodeToString(must(cavs.MarshalMsgpack()))})
		}
		base := must(macaroon.New(kid, os.Args[4], key))
		must(0, base.Add(&macaroon.ValidityWindow{NotBefore: 1, NotAfter: 4102444800}))
		baseTok := must(base.Encode())
		for _, name := range names[1:] {
			m := must(macaroon.Decode(baseTok))
			must(0, m.Add(sets[name]...))
			added := macaroon.NewCaveatSet(sets[name]...)
			out.Attenuation = append(out.Attenuation, attenuation{Name: name,
				Base: macaroon.ToAuthorizationHeader(baseTok)[len("FlyV1 "):], Added: hex.EncodeToString(must(added.MarshalMsgpack())),
				Result: macaroon.ToAuthorizationHeader(must(m.Encode()))[len("FlyV1 "):]})
		}
		enc := json.NewEncoder(os.Stdout)
		enc.SetIndent("", "  ")
		must(0, enc.Encode(out))
	case "verify":
		key := macaroon.SigningKey(must(hex.DecodeString(os.Args[2])))
		scanner := bufio.NewScanner(os.Stdin)
		scanner.Buffer(make([]byte, 1<<20), 1<<20)
		for scanner.Scan() {
			line := strings.TrimSpace(strings.TrimPrefix(scanner.Text(), "FlyV1 "))
			result := map[string]any{}
			raw, err := macaroon.Parse(line)
			if err != nil || len(raw) != 1 {
				result["error"] = fmt.Sprintf("parse: %v (%d tokens)", err, len(raw))
			} else if m, err := macaroon.Decode(raw[0]); err != nil {
				result["error"] = "decode: " + err.Error()
			} else if cavs, err := m.Verify(key, nil, nil); err != nil {
				result["error"] = "verify: " + err.Error()
			} else {
				result["caveats"] = cavs
				result["kid"] = hex.EncodeToString(m.Nonce.KID)
				result["location"] = m.Location
			}
			must(0, json.NewEncoder(os.Stdout).Encode(result))
		}
	default:
		fmt.Fprintln(os.Stderr, "unknown mode", os.Args[1])
		os.Exit(2)
	}
}
