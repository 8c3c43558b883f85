// server.go: listens on $PORT on all addresses and drains gracefully on SIGTERM.
package main

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/signal"
	"sync/atomic"
	"syscall"
	"time"
)

func main() {
	version := "v1"
	if len(os.Args) > 1 {
		version = os.Args[1]
	}
	var draining atomic.Bool
	handler := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if draining.Load() {
			w.Header().Set("Connection", "close") // net/http closes the connection after this answer
		}
		fmt.Fprint(w, version)
	})
	ln, err := net.Listen("tcp", ":"+os.Getenv("PORT")) // no host: all addresses (:: and 0.0.0.0)
	if err != nil {
		panic(err)
	}
	srv := &http.Server{Handler: handler, IdleTimeout: 30 * time.Second}
	go srv.Serve(ln)

	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM)
	<-sig
	draining.Store(true)
	ln.Close() // stop accepting; open connections are still served
	// SetKeepAlivesEnabled(false) and Shutdown both close idle keep-alive connections at once: wait first,
	// so that by then each one has either been answered with "Connection: close" or been idle for 2 s.
	time.Sleep(2 * time.Second)
	srv.SetKeepAlivesEnabled(false)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	srv.Shutdown(ctx) // closes the idle connections, waits for requests in flight
}
