// Command goclient downloads zips through a GOPROXY the way the go command
// does, to find complete downloads a proxy forgets.
//
// Each run is one "go mod download": a fresh transport (a clone of Go's
// default one, so at most two idle connections per host: surplus ones are
// closed right after the last byte of a body), WORKERS goroutines fetching
// the run's zips. Some fetches also close every idle connection right after
// their body, and some use a transport without keep-alive, so connections
// end at every point around the last byte.
//
// Output: one line per download, "run path status bytes sha256", then "done".
package main

import (
	"bufio"
	"crypto/sha256"
	"encoding/hex"
	"flag"
	"fmt"
	"io"
	"net/http"
	"os"
	"strconv"
	"strings"
	"sync"
)

func main() {
	proxy := flag.String("proxy", "", "GOPROXY base URL")
	pathsFile := flag.String("paths", "", "file of zip paths, one a line; {run} is replaced by the run number")
	runs := flag.Int("runs", 1, "runs (fresh transports each)")
	workers := flag.Int("workers", 8, "concurrent downloads per run")
	flag.Parse()
	paths, err := readLines(*pathsFile)
	if err != nil || *proxy == "" {
		fmt.Fprintln(os.Stderr, "usage: goclient -proxy URL -paths FILE [-runs N] [-workers N]:", err)
		os.Exit(2)
	}
	out := bufio.NewWriter(os.Stdout)
	defer out.Flush()
	for run := 0; run < *runs; run++ {
		for _, line := range runOnce(*proxy, paths, run, *workers) {
			fmt.Fprintln(out, line)
		}
	}
	fmt.Fprintln(out, "done")
}

func runOnce(proxy string, paths []string, run, workers int) []string {
	keep := http.DefaultTransport.(*http.Transport).Clone()
	once := http.DefaultTransport.(*http.Transport).Clone()
	once.DisableKeepAlives = true
	defer keep.CloseIdleConnections()
	jobs := make(chan int)
	results := make([]string, len(paths))
	var wg sync.WaitGroup
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range jobs {
				path := expand(paths[i], run)
				transport := keep
				if i%5 == 4 {
					transport = once
				}
				results[i] = fmt.Sprintf("%d %s %s", run, path, fetch(transport, proxy+"/"+path))
				if i%3 == 0 {
					keep.CloseIdleConnections() // as the go command does between modules
				}
			}
		}()
	}
	for i := range paths {
		jobs <- i
	}
	close(jobs)
	wg.Wait()
	return results
}

// fetch returns "status bytes sha256", or "error 0 <message>".
func fetch(transport *http.Transport, url string) string {
	resp, err := (&http.Client{Transport: transport}).Get(url)
	if err != nil {
		return "error 0 " + oneWord(err)
	}
	hash := sha256.New()
	n, err := io.Copy(hash, resp.Body)
	resp.Body.Close() // the transport closes a surplus connection here, right after the last byte
	if err != nil {
		return fmt.Sprintf("error %d %s", n, oneWord(err))
	}
	return fmt.Sprintf("%d %d %s", resp.StatusCode, n, hex.EncodeToString(hash.Sum(nil)))
}

func expand(path string, run int) string {
	return strings.ReplaceAll(path, "{run}", strconv.Itoa(run))
}

func oneWord(err error) string {
	return strings.ReplaceAll(err.Error(), " ", "_")
}

func readLines(name string) ([]string, error) {
	f, err := os.Open(name)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var lines []string
	scanner := bufio.NewScanner(f)
	for scanner.Scan() {
		if line := scanner.Text(); line != "" {
			lines = append(lines, line)
		}
	}
	return lines, scanner.Err()
}
