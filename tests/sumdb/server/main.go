// Command sumdb-testserver is a real Go checksum database for the sidecar's tests.
//
// It builds a transparency log over a fixed set of module versions with
// golang.org/x/mod/sumdb (the server package and tlog, the code behind
// sum.golang.org) and serves its lookup, latest and tile endpoints over HTTP on
// loopback, both at the root (for GOSUMDB="<key> <url>") and under
// /sumdb/<name>/ (the proxy form, with /sumdb/<name>/supported).
//
//	sumdb-testserver -modules FILE [-name NAME] [-key SIGNER] [-filler N]
//	                 [-proxydir DIR] [-gomod FILE] [-madeup PREFIX] [-origin DIR]
//	                 [-hold-origin] [-listen 127.0.0.1:0]
//
// Each line of FILE names one module version, in one of three forms:
//
//	<module> <version> <zip file> <go.mod file>   hashes given files
//	<module> <version> <source dir>               zips the dir as the go command does
//	<module> <version>                            made up: see -gomod
//
// The second form writes the zip, .mod and .info into DIR (-proxydir) laid out
// as a GOPROXY tree, so the go command can download what the database vouches
// for. A made-up module's go.mod is the -gomod file with {module} replaced by
// its path, and its zip holds that go.mod alone (the benchmark's upstreams
// serve such modules). A lookup of a version the tree does not hold yet adds
// it, as sum.golang.org does: a made-up one when its path starts with -madeup,
// else one read from -origin (a GOPROXY tree: the .mod, and the .zip when it
// is there); anything else is not found. -hold-origin adds every version of
// -origin before serving instead, as the real database holds a real build's
// modules long before the build. Hashes are computed with
// golang.org/x/mod/sumdb/dirhash, as the go command computes them. -filler N
// adds N synthetic records before the modules, so that records sit in full and
// partial tiles at several levels.
//
// Standard output: the verifier key on the first line, then one JSON object
// with the base URL, the tree size and each module's record id and hashes
// (made-up modules left out).
// The process serves until it is killed or its standard input closes.
package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"

	"golang.org/x/mod/module"
	"golang.org/x/mod/sumdb"
	"golang.org/x/mod/sumdb/dirhash"
	"golang.org/x/mod/sumdb/note"
	modzip "golang.org/x/mod/zip"
)

type entry struct {
	ID    int64  `json:"id"`
	Zip   string `json:"zip"`
	GoMod string `json:"gomod"`
}

type report struct {
	URL     string           `json:"url"`
	Name    string           `json:"name"`
	Size    int64            `json:"size"`
	Modules map[string]entry `json:"modules"`
}

func main() {
	name := flag.String("name", "sumdb.test.localhost", "database name (the verifier key's name)")
	key := flag.String("key", "", "signer key PRIVATE+KEY+<name>+...; generated when empty")
	modules := flag.String("modules", "", "file listing the module versions of the tree")
	filler := flag.Int("filler", 0, "synthetic records added before the modules")
	proxyDir := flag.String("proxydir", "", "GOPROXY tree written for modules given as a source dir")
	gomodFile := flag.String("gomod", "", "go.mod of made-up modules, {module} for the module path")
	madeUp := flag.String("madeup", "", "module path prefix of versions made up on their first lookup")
	origin := flag.String("origin", "", "GOPROXY tree other versions are read from on their first lookup")
	holdOrigin := flag.Bool("hold-origin", false, "add every version of -origin to the tree before serving")
	listen := flag.String("listen", "127.0.0.1:0", "address to serve on (loopback)")
	flag.Parse()
	log.SetFlags(0)
	log.SetPrefix("sumdb-testserver: ")

	skey, vkey := signerKey(*name, *key)
	src := sources{proxyDir: *proxyDir, madeUpPrefix: *madeUp, origin: *origin}
	if *gomodFile != "" {
		data, err := os.ReadFile(*gomodFile)
		if err != nil {
			log.Fatal(err)
		}
		src.gomod = string(data)
	}
	records, order, err := readModules(*modules, src)
	if err != nil {
		log.Fatal(err)
	}
	if *holdOrigin {
		if order, err = src.holdOrigin(records, order); err != nil {
			log.Fatal(err)
		}
	}
	fillers := fillerRecords(*filler)
	// Called by TestServer.Lookup outside its lock: reads only what is fixed by now.
	ops := sumdb.NewTestServer(skey, func(path, vers string) ([]byte, error) {
		key := path + "@" + vers
		if text, ok := fillers[key]; ok {
			return text, nil
		}
		if r, ok := records[key]; ok {
			return r.text, nil
		}
		r, err := src.onDemand(module.Version{Path: path, Version: vers})
		if err != nil {
			return nil, err
		}
		return r.text, nil
	})

	// Add every record now, fillers first, so ids and tree are fixed before serving.
	out := report{Name: *name, Modules: map[string]entry{}}
	ctx := context.Background()
	for i := range *filler {
		if _, err := ops.Lookup(ctx, fillerVersion(i)); err != nil {
			log.Fatal(err)
		}
	}
	for _, key := range order {
		r := records[key]
		id, err := ops.Lookup(ctx, r.mod)
		if err != nil {
			log.Fatal(err)
		}
		if !r.madeUp { // thousands of them in a benchmark: its caller knows them
			out.Modules[key] = entry{ID: id, Zip: r.zipHash, GoMod: r.modHash}
		}
	}
	out.Size = int64(*filler + len(order))

	ln, err := net.Listen("tcp", *listen)
	if err != nil {
		log.Fatal(err)
	}
	out.URL = "http://" + ln.Addr().String()
	fmt.Println(vkey)
	if err := json.NewEncoder(os.Stdout).Encode(out); err != nil {
		log.Fatal(err)
	}

	go func() {
		io.Copy(io.Discard, os.Stdin)
		os.Exit(0)
	}()
	log.Fatal(http.Serve(ln, handler(*name, sumdb.NewServer(ops))))
}

func handler(name string, srv *sumdb.Server) http.Handler {
	mux := http.NewServeMux()
	for _, p := range sumdb.ServerPaths {
		mux.Handle(p, srv)
	}
	prefix := "/sumdb/" + name
	mux.Handle(prefix+"/", http.StripPrefix(prefix, srv))
	mux.HandleFunc(prefix+"/supported", func(w http.ResponseWriter, r *http.Request) {})
	return mux
}

func signerKey(name, given string) (skey, vkey string) {
	if given == "" {
		skey, vkey, err := note.GenerateKey(rand.Reader, name)
		if err != nil {
			log.Fatal(err)
		}
		return skey, vkey
	}
	signer, err := note.NewSigner(given)
	if err != nil {
		log.Fatalf("-key: %v", err)
	}
	// A Signer does not give its public key: derive it from the seed (NewSigner checked
	// the form: PRIVATE+KEY+<name>+<hash>+<alg byte and 32-byte seed>).
	fields := strings.SplitN(given, "+", 5) // base64 may hold "+" too
	seed, _ := base64.StdEncoding.DecodeString(fields[4])
	public := ed25519.NewKeyFromSeed(seed[1:]).Public().(ed25519.PublicKey)
	vkey, err = note.NewEd25519VerifierKey(signer.Name(), public)
	if err != nil {
		log.Fatal(err)
	}
	return given, vkey
}

type record struct {
	mod     module.Version
	text    []byte
	zipHash string
	modHash string
	madeUp  bool
}

// sources says where records come from besides given files.
type sources struct {
	proxyDir     string
	gomod        string // template of made-up modules' go.mod
	madeUpPrefix string
	origin       string
}

func readModules(file string, src sources) (map[string]*record, []string, error) {
	records := map[string]*record{}
	var order []string
	if file == "" {
		return records, order, nil
	}
	f, err := os.Open(file)
	if err != nil {
		return nil, nil, err
	}
	defer f.Close()
	scanner := bufio.NewScanner(f)
	for line := 1; scanner.Scan(); line++ {
		fields := strings.Fields(scanner.Text())
		if len(fields) == 0 || strings.HasPrefix(fields[0], "#") {
			continue
		}
		r, err := readModule(fields, src)
		if err != nil {
			return nil, nil, fmt.Errorf("%s:%d: %v", file, line, err)
		}
		key := r.mod.String()
		if records[key] == nil {
			order = append(order, key)
		}
		records[key] = r
	}
	return records, order, scanner.Err()
}

func readModule(fields []string, src sources) (*record, error) {
	if len(fields) < 2 || len(fields) > 4 {
		return nil, fmt.Errorf("want <module> <version> [<zip> <go.mod> | <dir>]")
	}
	mod := module.Version{Path: fields[0], Version: fields[1]}
	if err := module.Check(mod.Path, mod.Version); err != nil {
		return nil, err
	}
	if len(fields) == 2 {
		return src.madeUp(mod)
	}
	zipFile, modFile := "", ""
	if len(fields) == 4 {
		zipFile, modFile = fields[2], fields[3]
	} else {
		var err error
		if zipFile, modFile, err = writeProxyFiles(mod, fields[2], src.proxyDir); err != nil {
			return nil, err
		}
	}
	zipHash, err := dirhash.HashZip(zipFile, dirhash.Hash1)
	if err != nil {
		return nil, err
	}
	data, err := os.ReadFile(modFile)
	if err != nil {
		return nil, err
	}
	return newRecord(mod, zipHash, data)
}

// madeUp is the record of a module whose zip holds its go.mod (the template) alone.
func (src sources) madeUp(mod module.Version) (*record, error) {
	if src.gomod == "" {
		return nil, fmt.Errorf("%s: a made-up module needs -gomod", mod)
	}
	data := []byte(strings.ReplaceAll(src.gomod, "{module}", mod.Path))
	// The go command's zip hash: Hash1 over the files named <module>@<version>/<file>.
	zipHash, err := dirhash.Hash1([]string{mod.String() + "/go.mod"}, func(string) (io.ReadCloser, error) {
		return io.NopCloser(bytes.NewReader(data)), nil
	})
	if err != nil {
		return nil, err
	}
	r, err := newRecord(mod, zipHash, data)
	if r != nil {
		r.madeUp = true
	}
	return r, err
}

// onDemand is the record of a version first asked for by a lookup.
func (src sources) onDemand(mod module.Version) (*record, error) {
	if src.madeUpPrefix != "" && strings.HasPrefix(mod.Path, src.madeUpPrefix) {
		return src.madeUp(mod)
	}
	if src.origin == "" {
		return nil, os.ErrNotExist
	}
	escPath, err := module.EscapePath(mod.Path)
	if err != nil {
		return nil, os.ErrNotExist
	}
	escVers, err := module.EscapeVersion(mod.Version)
	if err != nil {
		return nil, os.ErrNotExist
	}
	base := filepath.Join(src.origin, filepath.FromSlash(escPath), "@v", escVers)
	data, err := os.ReadFile(base + ".mod") // a missing file is os.ErrNotExist: 404
	if err != nil {
		return nil, err
	}
	zipHash := ""
	if _, err := os.Stat(base + ".zip"); err == nil {
		if zipHash, err = dirhash.HashZip(base+".zip", dirhash.Hash1); err != nil {
			return nil, err
		}
	}
	return newRecord(mod, zipHash, data)
}

// holdOrigin adds every version of the origin tree (each .mod file) that records
// does not hold yet, in path order: the modules of a real build are in the real
// database long before the build, so their lookups find them there.
func (src sources) holdOrigin(records map[string]*record, order []string) ([]string, error) {
	if src.origin == "" {
		return nil, fmt.Errorf("-hold-origin needs -origin")
	}
	var mods []module.Version
	err := filepath.WalkDir(src.origin, func(file string, d os.DirEntry, err error) error {
		if err != nil || d.IsDir() || !strings.HasSuffix(file, ".mod") {
			return err
		}
		rel, err := filepath.Rel(src.origin, file)
		if err != nil {
			return err
		}
		escPath, escVers, ok := strings.Cut(filepath.ToSlash(rel), "/@v/")
		if !ok {
			return nil // not a version's file (a cached list, a lock)
		}
		path, err := module.UnescapePath(escPath)
		if err != nil {
			return fmt.Errorf("%s: %v", file, err)
		}
		vers, err := module.UnescapeVersion(strings.TrimSuffix(escVers, ".mod"))
		if err != nil {
			return fmt.Errorf("%s: %v", file, err)
		}
		mods = append(mods, module.Version{Path: path, Version: vers})
		return nil
	})
	if err != nil {
		return nil, err
	}
	for _, mod := range mods {
		key := mod.String()
		if records[key] != nil {
			continue
		}
		r, err := src.onDemand(mod)
		if err != nil {
			return nil, fmt.Errorf("%s: %v", key, err)
		}
		records[key] = r
		order = append(order, key)
	}
	return order, nil
}

// newRecord holds the go.sum lines of mod; without zipHash, the go.mod line alone
// (a version whose zip the origin does not have: the go command fetched only its go.mod).
func newRecord(mod module.Version, zipHash string, data []byte) (*record, error) {
	// The go command's go.mod hash: Hash1 over one file named "go.mod".
	modHash, err := dirhash.Hash1([]string{"go.mod"}, func(string) (io.ReadCloser, error) {
		return io.NopCloser(bytes.NewReader(data)), nil
	})
	if err != nil {
		return nil, err
	}
	text := fmt.Sprintf("%s %s/go.mod %s\n", mod.Path, mod.Version, modHash)
	if zipHash != "" {
		text = fmt.Sprintf("%s %s %s\n", mod.Path, mod.Version, zipHash) + text
	}
	return &record{mod: mod, text: []byte(text), zipHash: zipHash, modHash: modHash}, nil
}

// writeProxyFiles zips dir as module mod into proxyDir's GOPROXY layout.
func writeProxyFiles(mod module.Version, dir, proxyDir string) (zipFile, modFile string, err error) {
	if proxyDir == "" {
		return "", "", fmt.Errorf("a source dir needs -proxydir")
	}
	escPath, err := module.EscapePath(mod.Path)
	if err != nil {
		return "", "", err
	}
	escVers, err := module.EscapeVersion(mod.Version)
	if err != nil {
		return "", "", err
	}
	base := filepath.Join(proxyDir, filepath.FromSlash(escPath), "@v", escVers)
	if err := os.MkdirAll(filepath.Dir(base), 0o777); err != nil {
		return "", "", err
	}
	var buf bytes.Buffer
	if err := modzip.CreateFromDir(&buf, mod, dir); err != nil {
		return "", "", err
	}
	gomod, err := os.ReadFile(filepath.Join(dir, "go.mod"))
	if err != nil {
		return "", "", err
	}
	info := fmt.Sprintf("{\"Version\":%q,\"Time\":\"2024-01-01T00:00:00Z\"}\n", mod.Version)
	for suffix, data := range map[string][]byte{".zip": buf.Bytes(), ".mod": gomod, ".info": []byte(info)} {
		if err := os.WriteFile(base+suffix, data, 0o666); err != nil {
			return "", "", err
		}
	}
	list, _ := os.ReadFile(filepath.Join(filepath.Dir(base), "list"))
	list = append(list, mod.Version+"\n"...)
	if err := os.WriteFile(filepath.Join(filepath.Dir(base), "list"), list, 0o666); err != nil {
		return "", "", err
	}
	return base + ".zip", base + ".mod", nil
}

func fillerVersion(i int) module.Version {
	return module.Version{Path: fmt.Sprintf("example.com/filler/m%05d", i), Version: "v1.0.0"}
}

// fillerRecords are well-formed records whose hashes name no real content.
func fillerRecords(n int) map[string][]byte {
	out := make(map[string][]byte, n)
	for i := range n {
		mod := fillerVersion(i)
		sum := sha256.Sum256([]byte(mod.String()))
		h := "h1:" + base64.StdEncoding.EncodeToString(sum[:])
		out[mod.String()] = fmt.Appendf(nil, "%s %s %s\n%s %s/go.mod %s\n", mod.Path, mod.Version, h, mod.Path, mod.Version, h)
	}
	return out
}
