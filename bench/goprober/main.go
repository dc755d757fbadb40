// The Go floor: what Consul's agent pays for an HTTP check. net/http with keep-alives off,
// so every probe opens a new connection, as announcer's do.
//
//	go build -o goprober main.go && ./goprober http://127.0.0.1:8080/ 2
package main

import (
	"fmt"
	"io"
	"net/http"
	"os"
	"strconv"
	"time"
)

func main() {
	url := os.Args[1]
	interval, err := strconv.ParseFloat(os.Args[2], 64)
	if err != nil {
		fmt.Fprintln(os.Stderr, "interval:", err)
		os.Exit(2)
	}
	period := time.Duration(interval * float64(time.Second))
	client := &http.Client{
		Timeout:   period / 2,
		Transport: &http.Transport{DisableKeepAlives: true},
	}
	fmt.Println("ready")
	for range time.Tick(period) {
		resp, err := client.Get(url)
		if err != nil {
			fmt.Println("failed", err)
			continue
		}
		io.Copy(io.Discard, io.LimitReader(resp.Body, 64*1024))
		resp.Body.Close()
		if resp.StatusCode >= 400 {
			fmt.Println("failed", resp.StatusCode)
		}
	}
}
