// Command ferryman-vcsim runs govmomi's vCenter simulator for Ferryman's vSphere tests.
//
// Debian packages the simulator library (golang-github-vmware-govmomi-dev 0.24.2) but not the
// vcsim program, so this launcher is built offline from it (images/vcsim/build.sh). Everything
// it serves is real vcsim: login, inventory, CBT flags, snapshots, power operations and the
// datastore /folder endpoint with Range requests.
//
// vcsim has no QueryChangedDiskAreas. With -cbt the launcher puts ONE test layer in front of
// the SOAP endpoint (cbt.go) that answers that call from the real differences of each disk's
// datastore file between snapshots, and stamps the changeIds that real CBT would put on the
// disk backings. Every other request goes to vcsim untouched.
//
// On start it prints one JSON line (url, datastore directories, certificate) to stdout and
// runs until SIGTERM or SIGINT, then removes the datastore directories it created.
package main

import (
	"crypto/sha256"
	"crypto/tls"
	"encoding/hex"
	"encoding/json"
	"flag"
	"fmt"
	"log"
	"net/url"
	"os"
	"os/signal"
	"syscall"

	"github.com/vmware/govmomi/simulator"
)

func main() {
	listen := flag.String("listen", "127.0.0.1:0", "address to listen on (host:port)")
	certFile := flag.String("cert", "", "PEM certificate (default: the simulator's built-in localhost certificate)")
	keyFile := flag.String("key", "", "PEM key for -cert")
	username := flag.String("username", "", "the only user allowed to log in (default: any non-empty user)")
	passwordFile := flag.String("password-file", "", "file holding the password for -username (kept out of argv)")
	cbt := flag.Bool("cbt", true, "answer QueryChangedDiskAreas from datastore file differences")
	pageBytes := flag.Int64("qcda-page", 16<<20, "disk bytes covered by one QueryChangedDiskAreas reply, to exercise paging")
	blockBytes := flag.Int64("cbt-block", 64<<10, "change-tracking granularity in bytes")
	flag.Parse()
	log.SetPrefix("ferryman-vcsim: ")

	model := simulator.VPX()
	model.Datacenter = 1
	model.Cluster = 0
	model.Host = 1
	model.Machine = 1
	model.Datastore = 1
	if err := model.Create(); err != nil {
		log.Fatalf("creating the inventory: %v", err)
	}
	defer model.Remove()

	model.Service.TLS = new(tls.Config)
	if *certFile != "" {
		cert, err := tls.LoadX509KeyPair(*certFile, *keyFile)
		if err != nil {
			log.Fatalf("loading -cert/-key: %v", err)
		}
		model.Service.TLS.Certificates = []tls.Certificate{cert}
	}
	u := &url.URL{Host: *listen}
	if *username != "" {
		pw := ""
		if *passwordFile != "" {
			b, err := os.ReadFile(*passwordFile)
			if err != nil {
				log.Fatalf("reading -password-file: %v", err)
			}
			pw = string(trimNewline(b))
		}
		u.User = url.UserPassword(*username, pw)
	}
	model.Service.Listen = u

	server := model.Service.NewServer()
	defer server.Close()
	if *cbt {
		server.Config.Handler = newCBTLayer(server.Config.Handler, *pageBytes, *blockBytes)
	}

	datastores := map[string]string{}
	for _, e := range simulator.Map.All("Datastore") {
		ds := e.(*simulator.Datastore)
		datastores[ds.Name] = ds.Info.GetDatastoreInfo().Url
	}
	der := server.Server.TLS.Certificates[0].Certificate[0]
	sum := sha256.Sum256(der)
	info := map[string]interface{}{
		"url":        "https://" + server.URL.Host + "/sdk",
		"host":       server.URL.Hostname(),
		"port":       server.URL.Port(),
		"datastores": datastores,
		"sha256":     hex.EncodeToString(sum[:]),
		"pid":        os.Getpid(),
	}
	out, _ := json.Marshal(info)
	fmt.Println(string(out))

	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	<-sig
}

func trimNewline(b []byte) []byte {
	for len(b) > 0 && (b[len(b)-1] == '\n' || b[len(b)-1] == '\r') {
		b = b[:len(b)-1]
	}
	return b
}
