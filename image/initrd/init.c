/*
 * The tuned pod VM image's initramfs init (image/recipe.sh tiny_initrd): load the few kernel modules
 * the root disk needs, mount the root file system, hand over to its /sbin/init.  It replaces
 * initramfs-tools (a shell, udev and a dozen scripts), which under QEMU TCG took seconds of every
 * boot (docs/image-tuning.md has the figures).
 *
 * What it understands of the kernel command line: root=/dev/NAME (a device node; no LABEL=/UUID=:
 * nothing runs here that could resolve them), rootfstype= (default ext4), rootflags=, ro/rw (last
 * one wins; the kernel's default is ro) and init= (default /sbin/init).  The modules are the files
 * named, one per line and in load order, by /modules (written by image/initrd/mkinitrd.py from the
 * kernel's modules.dep).
 *
 * Every failure is fatal: init exits, the kernel panics and, with panic=-1 on the command line,
 * reboots at once; the message before that is on the console.  Every wait is bounded.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define ROOT_WAIT_MS 30000 /* a missing root disk fails within this, instead of hanging the VM */

static void die(const char *what, const char *arg)
{
	fprintf(stderr, "tiny-init: %s %s: %s\n", what, arg ? arg : "", strerror(errno));
	exit(1);
}

/* Read a small file (the command line, the module list) into a NUL-terminated buffer. */
static char *slurp(const char *path, size_t max)
{
	char *buf = malloc(max + 1);
	size_t n = 0;
	ssize_t r;
	int fd = open(path, O_RDONLY | O_CLOEXEC);

	if (!buf || fd < 0)
		die("cannot open", path);
	while (n < max && (r = read(fd, buf + n, max - n)) > 0)
		n += (size_t)r;
	close(fd);
	buf[n] = '\0';
	return buf;
}

struct options {
	const char *root, *fstype, *flags, *init;
	unsigned long mountflags;
};

static void parse_cmdline(char *line, struct options *o)
{
	char *save = NULL;

	for (char *tok = strtok_r(line, " \t\n", &save); tok; tok = strtok_r(NULL, " \t\n", &save)) {
		if (!strncmp(tok, "root=", 5))
			o->root = tok + 5;
		else if (!strncmp(tok, "rootfstype=", 11))
			o->fstype = tok + 11;
		else if (!strncmp(tok, "rootflags=", 10))
			o->flags = tok + 10;
		else if (!strncmp(tok, "init=", 5))
			o->init = tok + 5;
		else if (!strcmp(tok, "rw"))
			o->mountflags &= ~(unsigned long)MS_RDONLY;
		else if (!strcmp(tok, "ro"))
			o->mountflags |= MS_RDONLY;
	}
}

static void load_modules(void)
{
	char *list = slurp("/modules", 4096), *save = NULL;

	for (char *m = strtok_r(list, "\n", &save); m; m = strtok_r(NULL, "\n", &save)) {
		int fd = open(m, O_RDONLY | O_CLOEXEC);

		if (fd < 0)
			die("cannot open module", m);
		if (syscall(SYS_finit_module, fd, "", 0) != 0 && errno != EEXIST)
			die("cannot load module", m);
		close(fd);
		unlink(m); /* the initramfs is memory: free what is no longer needed */
	}
	free(list);
	unlink("/modules");
}

/* The driver creates the node in devtmpfs when it finds the disk; poll for it, bounded. */
static void wait_for_block(const char *dev)
{
	const struct timespec step = {0, 5 * 1000 * 1000};
	struct stat st;

	for (int ms = 0; ms < ROOT_WAIT_MS; ms += 5) {
		if (stat(dev, &st) == 0 && S_ISBLK(st.st_mode))
			return;
		nanosleep(&step, NULL);
	}
	errno = ETIMEDOUT;
	die("no root device", dev);
}

int main(int argc, char **argv)
{
	struct options o = {NULL, "ext4", NULL, "/sbin/init", MS_RDONLY};

	(void)argc;
	if (mount("devtmpfs", "/dev", "devtmpfs", MS_NOSUID, "mode=0755") != 0)
		die("cannot mount", "/dev");
	if (mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL) != 0)
		die("cannot mount", "/proc");
	parse_cmdline(slurp("/proc/cmdline", 4096), &o);
	umount("/proc");
	if (!o.root || strncmp(o.root, "/dev/", 5) != 0) {
		errno = EINVAL;
		die("root= must name a device node, not", o.root ? o.root : "(none)");
	}

	load_modules();
	wait_for_block(o.root);
	if (mount(o.root, "/root", o.fstype, o.mountflags, o.flags) != 0)
		die("cannot mount root", o.root);

	/* switch_root: the root file system becomes /, devtmpfs goes along; this program's file goes. */
	unlink("/init");
	if (mount("/dev", "/root/dev", NULL, MS_MOVE, NULL) != 0)
		die("cannot move", "/dev");
	if (chdir("/root") != 0 || mount(".", "/", NULL, MS_MOVE, NULL) != 0 || chroot(".") != 0 || chdir("/") != 0)
		die("cannot switch to", "/root");
	argv[0] = (char *)o.init;
	execv(o.init, argv);
	die("cannot run", o.init);
}
