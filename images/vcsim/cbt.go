package main

// The one test double of Ferryman's vSphere tests: Changed Block Tracking for vcsim.
//
// vcsim 0.24.2 keeps the CBT flag (config.changeTrackingEnabled) but has no change tracking:
// no changeId on disk backings and no QueryChangedDiskAreas. This layer sits in front of
// vcsim's SOAP endpoint and behaves like ESXi's CBT as far as a backup client can see:
//
//   - CBT takes effect only at a stun/unstun point: the first snapshot (or power-on) after it
//     is enabled. Until then QueryChangedDiskAreas fails, as on ESXi.
//   - Each snapshot stamps a new changeId "<epoch>/<n>" on every disk backing (the VM's and
//     the snapshot's copy) and records SHA-256 hashes of the disk's -flat.vmdk per block. The
//     test never writes the file while a snapshot exists, so these are the frozen contents.
//   - QueryChangedDiskAreas(snapshot, deviceKey, startOffset, changeId) answers from the real
//     differences between the file as it was at changeId and at the snapshot; "*" returns the
//     blocks that are not all zero (ESXi returns the allocated areas). Replies cover at most
//     -qcda-page bytes, so clients must page with startOffset = startOffset + length.
//   - Disabling CBT forgets every changeId; re-enabling starts a new epoch, so an old changeId
//     is refused with InvalidArgument(changeId), as after a CBT reset on ESXi.
//
// Everything else (including the snapshot itself) is vcsim's own behaviour.

import (
	"bytes"
	"crypto/rand"
	"crypto/sha256"
	"fmt"
	"html"
	"io"
	"io/ioutil"
	"log"
	"net/http"
	"net/http/httptest"
	"os"
	"path"
	"strings"
	"sync"

	"github.com/vmware/govmomi/object"
	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25/types"
)

type diskTrack struct {
	epoch  string
	seq    int
	states map[string][][32]byte // changeId -> block hashes of the frozen file
	sizes  map[string]int64      // changeId -> file size
}

type vmTrack struct {
	active bool                                              // CBT took effect (stun/unstun seen)
	disks  map[int32]*diskTrack                              // device key -> tracking
	snaps  map[types.ManagedObjectReference]map[int32]string // snapshot -> device key -> changeId
}

type cbtLayer struct {
	next  http.Handler
	page  int64
	block int64
	mu    sync.Mutex
	vms   map[string]*vmTrack
	zero  [32]byte
}

func newCBTLayer(next http.Handler, page, block int64) *cbtLayer {
	return &cbtLayer{
		next: next, page: page, block: block,
		vms:  map[string]*vmTrack{},
		zero: sha256.Sum256(make([]byte, block)),
	}
}

func (l *cbtLayer) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodPost || r.URL.Path != "/sdk" {
		l.next.ServeHTTP(w, r)
		return
	}
	body, err := ioutil.ReadAll(r.Body)
	_ = r.Body.Close()
	if err != nil {
		w.WriteHeader(http.StatusBadRequest)
		return
	}
	r.Body = ioutil.NopCloser(bytes.NewReader(body))
	method, err := simulator.UnmarshalBody(types.TypeFunc(), body)
	if err != nil {
		l.next.ServeHTTP(w, r)
		return
	}
	switch method.Name {
	case "QueryChangedDiskAreas":
		l.queryChangedDiskAreas(w, method.Body.(*types.QueryChangedDiskAreas))
	case "CreateSnapshot_Task":
		l.mu.Lock()
		defer l.mu.Unlock()
		stamped := l.stamp(method.This)
		rec := httptest.NewRecorder()
		l.next.ServeHTTP(rec, r)
		l.recordSnapshot(method.This, stamped)
		copyResponse(w, rec)
	case "ReconfigVM_Task":
		l.mu.Lock()
		defer l.mu.Unlock()
		rec := httptest.NewRecorder()
		l.next.ServeHTTP(rec, r)
		if spec := method.Body.(*types.ReconfigVM_Task).Spec; spec.ChangeTrackingEnabled != nil {
			l.flagChanged(method.This)
		}
		copyResponse(w, rec)
	case "PowerOnVM_Task":
		l.mu.Lock()
		defer l.mu.Unlock()
		l.next.ServeHTTP(w, r)
		if vm := getVM(method.This); vm != nil && vm.Config.ChangeTrackingEnabled != nil &&
			*vm.Config.ChangeTrackingEnabled {
			l.track(method.This.Value).active = true
		}
	default:
		l.next.ServeHTTP(w, r)
	}
}

func copyResponse(w http.ResponseWriter, rec *httptest.ResponseRecorder) {
	for k, v := range rec.Header() {
		w.Header()[k] = v
	}
	w.WriteHeader(rec.Code)
	_, _ = io.Copy(w, rec.Body)
}

func getVM(ref types.ManagedObjectReference) *simulator.VirtualMachine {
	vm, _ := simulator.Map.Get(ref).(*simulator.VirtualMachine)
	return vm
}

func (l *cbtLayer) track(vm string) *vmTrack {
	t := l.vms[vm]
	if t == nil {
		t = &vmTrack{disks: map[int32]*diskTrack{}, snaps: map[types.ManagedObjectReference]map[int32]string{}}
		l.vms[vm] = t
	}
	return t
}

func newEpoch() string {
	b := make([]byte, 16)
	_, _ = rand.Read(b)
	b[0] = 0x52
	h := make([]string, 16)
	for i, c := range b {
		h[i] = fmt.Sprintf("%02x", c)
	}
	return strings.Join(h[:8], " ") + "-" + strings.Join(h[8:], " ")
}

// flatPath maps a disk backing "[ds] dir/disk.vmdk" to the local file of disk-flat.vmdk.
func flatPath(vm *simulator.VirtualMachine, fileName string) (string, error) {
	var p object.DatastorePath
	if !p.FromString(fileName) {
		return "", fmt.Errorf("bad datastore path %q", fileName)
	}
	for _, e := range simulator.Map.All("Datastore") {
		ds := e.(*simulator.Datastore)
		if ds.Name == p.Datastore {
			flat := strings.TrimSuffix(p.Path, ".vmdk") + "-flat.vmdk"
			return path.Join(ds.Info.GetDatastoreInfo().Url, flat), nil
		}
	}
	return "", fmt.Errorf("datastore %q not found", p.Datastore)
}

func (l *cbtLayer) hashFile(name string) ([][32]byte, int64, error) {
	f, err := os.Open(name)
	if err != nil {
		return nil, 0, err
	}
	defer f.Close()
	var hashes [][32]byte
	var size int64
	buf := make([]byte, l.block)
	for {
		n, err := io.ReadFull(f, buf)
		if n > 0 {
			for i := n; i < len(buf); i++ {
				buf[i] = 0
			}
			hashes = append(hashes, sha256.Sum256(buf))
			size += int64(n)
		}
		if err == io.EOF || err == io.ErrUnexpectedEOF {
			return hashes, size, nil
		}
		if err != nil {
			return nil, 0, err
		}
	}
}

func disks(vm *simulator.VirtualMachine) []*types.VirtualDisk {
	var out []*types.VirtualDisk
	for _, d := range vm.Config.Hardware.Device {
		if disk, ok := d.(*types.VirtualDisk); ok {
			out = append(out, disk)
		}
	}
	return out
}

// stamp gives each disk of a CBT-enabled VM a new changeId and records the file's blocks.
func (l *cbtLayer) stamp(ref types.ManagedObjectReference) map[int32]string {
	vm := getVM(ref)
	if vm == nil || vm.Config.ChangeTrackingEnabled == nil || !*vm.Config.ChangeTrackingEnabled {
		return nil
	}
	t := l.track(ref.Value)
	t.active = true
	stamped := map[int32]string{}
	simulator.Map.WithLock(vm, func() {
		for _, disk := range disks(vm) {
			b, ok := disk.Backing.(*types.VirtualDiskFlatVer2BackingInfo)
			if !ok {
				continue
			}
			file, err := flatPath(vm, b.FileName)
			if err != nil {
				log.Printf("cbt: %s disk %d: %v", ref.Value, disk.Key, err)
				continue
			}
			hashes, size, err := l.hashFile(file)
			if err != nil {
				log.Printf("cbt: %s disk %d: %v", ref.Value, disk.Key, err)
				continue
			}
			d := t.disks[disk.Key]
			if d == nil {
				d = &diskTrack{epoch: newEpoch(), states: map[string][][32]byte{}, sizes: map[string]int64{}}
				t.disks[disk.Key] = d
			}
			d.seq++
			id := fmt.Sprintf("%s/%d", d.epoch, d.seq)
			d.states[id] = hashes
			d.sizes[id] = size
			b.ChangeId = id
			stamped[disk.Key] = id
		}
	})
	return stamped
}

// recordSnapshot ties the new snapshot to the stamped changeIds and gives the snapshot its own
// copy of the disk devices (vcsim shares them with the VM), so later stamps do not alter it.
func (l *cbtLayer) recordSnapshot(ref types.ManagedObjectReference, stamped map[int32]string) {
	vm := getVM(ref)
	if vm == nil || stamped == nil || vm.Snapshot == nil || vm.Snapshot.CurrentSnapshot == nil {
		return
	}
	snapRef := *vm.Snapshot.CurrentSnapshot
	l.track(ref.Value).snaps[snapRef] = stamped
	snap, ok := simulator.Map.Get(snapRef).(*simulator.VirtualMachineSnapshot)
	if !ok {
		return
	}
	devices := make([]types.BaseVirtualDevice, len(snap.Config.Hardware.Device))
	for i, d := range snap.Config.Hardware.Device {
		devices[i] = d
		if disk, ok := d.(*types.VirtualDisk); ok {
			c := *disk
			if b, ok := disk.Backing.(*types.VirtualDiskFlatVer2BackingInfo); ok {
				cb := *b
				c.Backing = &cb
			}
			devices[i] = &c
		}
	}
	snap.Config.Hardware.Device = devices
}

// flagChanged runs after a reconfigure that touched changeTrackingEnabled.
func (l *cbtLayer) flagChanged(ref types.ManagedObjectReference) {
	vm := getVM(ref)
	if vm == nil {
		return
	}
	enabled := vm.Config.ChangeTrackingEnabled != nil && *vm.Config.ChangeTrackingEnabled
	t := l.track(ref.Value)
	if enabled && t.active {
		return // already tracking: a no-op reconfigure keeps the epoch
	}
	// Disabled (or enabled again): every changeId is gone; a new epoch starts at the next
	// stun/unstun point.
	t.active = false
	t.disks = map[int32]*diskTrack{}
	t.snaps = map[types.ManagedObjectReference]map[int32]string{}
	simulator.Map.WithLock(vm, func() {
		for _, disk := range disks(vm) {
			if b, ok := disk.Backing.(*types.VirtualDiskFlatVer2BackingInfo); ok {
				b.ChangeId = ""
			}
		}
	})
}

type area struct{ start, length int64 }

func (l *cbtLayer) queryChangedDiskAreas(w http.ResponseWriter, req *types.QueryChangedDiskAreas) {
	l.mu.Lock()
	defer l.mu.Unlock()
	vm := getVM(req.This)
	if vm == nil {
		writeFault(w, "ManagedObjectNotFound", "The object has already been deleted or has not been completely created",
			fmt.Sprintf(`<obj type="VirtualMachine">%s</obj>`, html.EscapeString(req.This.Value)))
		return
	}
	t := l.vms[req.This.Value]
	if vm.Config.ChangeTrackingEnabled == nil || !*vm.Config.ChangeTrackingEnabled || t == nil || !t.active {
		writeFault(w, "FileFault", "Error caused by file: change tracking is not active for this disk",
			fmt.Sprintf("<file>%s-ctk.vmdk</file>", html.EscapeString(vm.Name)))
		return
	}
	if req.Snapshot == nil {
		writeInvalidArgument(w, "snapshot")
		return
	}
	ids, ok := t.snaps[*req.Snapshot]
	if !ok {
		writeInvalidArgument(w, "snapshot")
		return
	}
	curID, ok := ids[req.DeviceKey]
	d := t.disks[req.DeviceKey]
	if !ok || d == nil {
		writeInvalidArgument(w, "deviceKey")
		return
	}
	cur, size := d.states[curID], d.sizes[curID]
	var old [][32]byte
	if req.ChangeId != "*" {
		prev, ok := d.states[req.ChangeId]
		if !ok {
			writeInvalidArgument(w, "changeId")
			return
		}
		old = prev
	}
	if req.StartOffset < 0 || req.StartOffset >= size {
		writeInvalidArgument(w, "startOffset")
		return
	}
	end := req.StartOffset + l.page
	if end > size {
		end = size
	}
	var areas []area
	for i := req.StartOffset / l.block; i*l.block < end; i++ {
		changed := false
		if old == nil {
			changed = cur[i] != l.zero
		} else {
			changed = i >= int64(len(old)) || cur[i] != old[i]
		}
		if !changed {
			continue
		}
		s := i * l.block
		e := s + l.block
		if s < req.StartOffset {
			s = req.StartOffset
		}
		if e > end {
			e = end
		}
		if n := len(areas); n > 0 && areas[n-1].start+areas[n-1].length == s {
			areas[n-1].length += e - s
		} else {
			areas = append(areas, area{s, e - s})
		}
	}
	var b strings.Builder
	fmt.Fprintf(&b, "<QueryChangedDiskAreasResponse xmlns=\"urn:vim25\"><returnval>"+
		"<startOffset>%d</startOffset><length>%d</length>", req.StartOffset, end-req.StartOffset)
	for _, a := range areas {
		fmt.Fprintf(&b, "<changedArea><start>%d</start><length>%d</length></changedArea>", a.start, a.length)
	}
	b.WriteString("</returnval></QueryChangedDiskAreasResponse>")
	writeEnvelope(w, http.StatusOK, b.String())
}

func writeEnvelope(w http.ResponseWriter, status int, body string) {
	w.Header().Set("Content-Type", "text/xml; charset=utf-8")
	w.WriteHeader(status)
	fmt.Fprintf(w, `<?xml version="1.0" encoding="UTF-8"?>`+
		`<soapenv:Envelope xmlns:soapenc="http://schemas.xmlsoap.org/soap/encoding/" `+
		`xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/" `+
		`xmlns:xsd="http://www.w3.org/2001/XMLSchema" `+
		`xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">`+
		`<soapenv:Body>%s</soapenv:Body></soapenv:Envelope>`, body)
}

func writeFault(w http.ResponseWriter, kind, msg, fields string) {
	writeEnvelope(w, http.StatusInternalServerError, fmt.Sprintf(
		`<soapenv:Fault><faultcode>ServerFaultCode</faultcode><faultstring>%s</faultstring>`+
			`<detail><%sFault xmlns="urn:vim25" xsi:type="%s">%s</%sFault></detail></soapenv:Fault>`,
		html.EscapeString(msg), kind, kind, fields, kind))
}

func writeInvalidArgument(w http.ResponseWriter, prop string) {
	writeFault(w, "InvalidArgument", "A specified parameter was not correct: "+prop,
		"<invalidProperty>"+prop+"</invalidProperty>")
}
