/*
 * pct-oracle: the guest's own view of its page cache, for tests to compare pct with.
 *
 * Runs inside a lab guest (statically linked). For every regular file under the
 * given roots (and every file path given directly, e.g. /proc/PID/fd/N of a
 * deleted-but-open file) it finds the resident page-cache pages with mincore(2),
 * maps each one (a minor fault on a page that is already cached: no I/O, no
 * change to its contents), resolves its page frame number through
 * /proc/self/pagemap, and reads the kernel's flags for that frame from
 * /proc/kpageflags.
 *
 * Output (text, written at offset 0 of OUT, then a NUL byte):
 *   PCT-ORACLE 1
 *   F <st_dev major>:<minor> <ino> <size> <path>
 *   P <page index> <pfn> <kpageflags hex>
 *   ...
 *   END <files> <pages>
 *
 * Usage: pct-oracle OUT ROOT_OR_FILE...
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <unistd.h>

#define PAGE 4096UL

static FILE *out;
static int pagemap_fd, kpageflags_fd;
static unsigned long nfiles, npages;

static void report_file(const char *path)
{
	int fd = open(path, O_RDONLY | O_NOATIME);
	if (fd < 0)
		fd = open(path, O_RDONLY);
	if (fd < 0)
		return;
	struct stat st;
	if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode) || st.st_size == 0) {
		close(fd);
		return;
	}
	size_t len = (st.st_size + PAGE - 1) & ~(PAGE - 1);
	unsigned char *map = mmap(NULL, len, PROT_READ, MAP_SHARED, fd, 0);
	if (map == MAP_FAILED) {
		close(fd);
		return;
	}
	size_t n = len / PAGE;
	unsigned char *vec = malloc(n);
	if (!vec || mincore(map, len, vec) != 0) {
		free(vec);
		munmap(map, len);
		close(fd);
		return;
	}
	nfiles++;
	fprintf(out, "F %u:%u %lu %lld %s\n", major(st.st_dev), minor(st.st_dev),
		(unsigned long)st.st_ino, (long long)st.st_size, path);
	for (size_t i = 0; i < n; i++) {
		if (!(vec[i] & 1))
			continue;
		/* Map the cached page into our page table; it is resident, so this is a minor fault. */
		volatile unsigned char c = map[i * PAGE];
		(void)c;
		uint64_t pm = 0, kf = 0;
		off_t va = (off_t)(uintptr_t)(map + i * PAGE);
		if (pread(pagemap_fd, &pm, 8, va / PAGE * 8) != 8)
			continue;
		if (!(pm >> 63 & 1))
			continue;
		uint64_t pfn = pm & ((1ULL << 55) - 1);
		if (pread(kpageflags_fd, &kf, 8, pfn * 8) != 8)
			continue;
		fprintf(out, "P %zu %llu %llx\n", i, (unsigned long long)pfn, (unsigned long long)kf);
		npages++;
	}
	free(vec);
	munmap(map, len);
	close(fd);
}

static int visit(const char *path, const struct stat *sb, int type, struct FTW *ftw)
{
	(void)ftw;
	if (type == FTW_F && S_ISREG(sb->st_mode))
		report_file(path);
	return 0;
}

int main(int argc, char **argv)
{
	if (argc < 3) {
		fprintf(stderr, "usage: pct-oracle OUT ROOT_OR_FILE...\n");
		return 2;
	}
	pagemap_fd = open("/proc/self/pagemap", O_RDONLY);
	kpageflags_fd = open("/proc/kpageflags", O_RDONLY);
	if (pagemap_fd < 0 || kpageflags_fd < 0) {
		perror("pct-oracle: /proc/self/pagemap or /proc/kpageflags");
		return 1;
	}
	char *buf = NULL;
	size_t buflen = 0;
	out = open_memstream(&buf, &buflen);
	if (!out)
		return 1;
	fprintf(out, "PCT-ORACLE 1\n");
	for (int i = 2; i < argc; i++) {
		struct stat st;
		if (stat(argv[i], &st) != 0)
			continue;
		if (S_ISDIR(st.st_mode))
			nftw(argv[i], visit, 64, FTW_PHYS | FTW_MOUNT);
		else
			report_file(argv[i]);
	}
	fprintf(out, "END %lu %lu\n", nfiles, npages);
	fputc(0, out);
	fclose(out);

	int ofd = open(argv[1], O_WRONLY);
	if (ofd < 0) {
		perror("pct-oracle: open output");
		return 1;
	}
	size_t off = 0;
	while (off < buflen) {
		ssize_t w = write(ofd, buf + off, buflen - off);
		if (w <= 0) {
			perror("pct-oracle: write");
			return 1;
		}
		off += (size_t)w;
	}
	fsync(ofd);
	close(ofd);
	printf("PCT-ORACLE-DONE files=%lu pages=%lu bytes=%zu\n", nfiles, npages, buflen);
	return 0;
}
